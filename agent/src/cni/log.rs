//! The plugin's log: one line per message, to a file (appended) or to stderr, which the
//! runtime captures. Hand-written rather than `tracing-subscriber`: the plugin is exec'd for
//! every pod, so it keeps to std, and the format is one `format!`.
use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use super::config::LogLevel;

enum Sink {
    Stderr,
    File(File),
}

pub struct Logger {
    level: LogLevel,
    sink: Sink,
    /// `ADD 3f2a1b…`: which call a line belongs to.
    context: String,
}

impl Logger {
    pub fn stderr(level: LogLevel) -> Logger {
        Logger {
            level,
            sink: Sink::Stderr,
            context: String::new(),
        }
    }

    /// Appends to `file`; if it cannot be opened, says so on stderr and logs there instead.
    pub fn new(level: LogLevel, file: Option<&Path>) -> Logger {
        let mut log = Logger::stderr(level);
        if let Some(path) = file {
            match OpenOptions::new().create(true).append(true).open(path) {
                Ok(f) => log.sink = Sink::File(f),
                Err(e) => log.log(
                    LogLevel::Warn,
                    &format!(
                        "cannot open log_file {}: {e}; logging to stderr",
                        path.display()
                    ),
                ),
            }
        }
        log
    }

    pub fn set_context(&mut self, context: String) {
        self.context = context;
    }

    pub fn enabled(&self, level: LogLevel) -> bool {
        level <= self.level
    }

    pub fn log(&mut self, level: LogLevel, msg: &str) {
        if !self.enabled(level) {
            return;
        }
        let line = format!(
            "{} {:<5} sluice-cni[{}] {}{}{msg}\n",
            utc_now(),
            level.as_str(),
            std::process::id(),
            self.context,
            if self.context.is_empty() { "" } else { ": " },
        );
        // One write per line: O_APPEND keeps concurrent plugin calls' lines whole.
        let _ = match &mut self.sink {
            Sink::Stderr => std::io::stderr().write_all(line.as_bytes()),
            Sink::File(f) => f.write_all(line.as_bytes()),
        };
    }

    pub fn error(&mut self, msg: &str) {
        self.log(LogLevel::Error, msg)
    }
    pub fn warn(&mut self, msg: &str) {
        self.log(LogLevel::Warn, msg)
    }
    pub fn info(&mut self, msg: &str) {
        self.log(LogLevel::Info, msg)
    }
    pub fn debug(&mut self, msg: &str) {
        self.log(LogLevel::Debug, msg)
    }
}

/// `2024-05-01T12:34:56.789Z`.
fn utc_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn lines_go_to_the_file_above_the_level() {
        let path = std::env::temp_dir().join(format!("sluice-cni-log-{}", std::process::id()));
        let mut log = Logger::new(LogLevel::Info, Some(&path));
        log.set_context("ADD c1".into());
        log.debug("hidden");
        log.info("shown");
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("info  sluice-cni[") && text.ends_with("ADD c1: shown\n"),
            "{text}"
        );
    }
}
