//! Response shapes: `{"seq":S,"ok":true,...}` or `{"seq":S,"ok":false,"errno":N|null,
//! "error":"...","stage":"..."?,...}`. Fields gathered before a failure are kept.

use std::io;

use serde_json::{Map, Value};

use crate::sockets::errno_of;

pub type Fields = Map<String, Value>;

/// Why a command failed, plus whatever it learned before failing.
#[derive(Debug)]
pub struct Failure {
    pub errno: Option<i32>,
    pub error: String,
    /// Which step failed: "connect", "banner", "echo", "send", "recv", ...
    pub stage: Option<&'static str>,
    pub fields: Fields,
}

impl Failure {
    pub fn msg(error: impl Into<String>) -> Failure {
        Failure {
            errno: None,
            error: error.into(),
            stage: None,
            fields: Fields::new(),
        }
    }

    pub fn io(stage: &'static str, err: &io::Error) -> Failure {
        let error = match err.kind() {
            // Read timeouts surface as EAGAIN; say what they mean.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("timed out ({err})"),
            _ => err.to_string(),
        };
        Failure {
            errno: errno_of(err),
            error,
            stage: Some(stage),
            fields: Fields::new(),
        }
    }

    pub fn with_fields(mut self, fields: Fields) -> Failure {
        for (k, v) in fields {
            self.fields.entry(k).or_insert(v);
        }
        self
    }

    /// The failure as a JSON object (without seq/ok), e.g. for a loop's first error.
    pub fn to_json(&self) -> Value {
        let mut m = self.fields.clone();
        m.insert("errno".into(), self.errno.into());
        m.insert("error".into(), self.error.clone().into());
        if let Some(stage) = self.stage {
            m.insert("stage".into(), stage.into());
        }
        Value::Object(m)
    }
}

pub fn response(seq: &Value, outcome: Result<Fields, Failure>) -> Value {
    let mut m = Fields::new();
    m.insert("seq".into(), seq.clone());
    match outcome {
        Ok(fields) => {
            m.insert("ok".into(), true.into());
            m.extend(fields);
        }
        Err(f) => {
            m.insert("ok".into(), false.into());
            if let Value::Object(fields) = f.to_json() {
                m.extend(fields);
            }
        }
    }
    Value::Object(m)
}
