//! tracing setup: human or JSON lines on stderr, level from flag/env.
use tracing_subscriber::{EnvFilter, fmt};

use crate::cli::LogFormat;

pub fn init(level: &str, format: LogFormat) {
    // RUST_LOG, when set, wins over the flag's default.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| {
            EnvFilter::try_new(level).unwrap_or_else(|e| {
                eprintln!("invalid log level {level:?} ({e}); using info");
                EnvFilter::new("info")
            })
        });
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
