//! One JSON object per line, flushed at once, shared by all threads of a helper process.

use std::io::{self, Write};
use std::sync::Mutex;

use serde::Serialize;

pub struct Output {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Output {
    pub fn new(out: Box<dyn Write + Send>) -> Output {
        Output {
            out: Mutex::new(out),
        }
    }

    pub fn stdout() -> Output {
        Output::new(Box::new(io::stdout()))
    }

    /// Writes `value` as one line. Errors mean the reader is gone.
    pub fn emit(&self, value: &impl Serialize) -> io::Result<()> {
        let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
        line.push(b'\n');
        // A panicked writer thread cannot leave a half-written line behind (one
        // write_all per line), so a poisoned lock is still usable.
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(&line)?;
        out.flush()
    }
}
