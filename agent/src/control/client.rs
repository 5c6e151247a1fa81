//! Blocking client for the control socket (std only: the CNI plugin uses it too).
use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::api::{Request, decode_response, encode_line};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    #[error("the agent sent something unreadable: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the agent closed the connection without answering")]
    NoAnswer,
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the agent's result.
pub fn call(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(&encode_line(req)?)?;
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    if reader.read_line(&mut answer)? == 0 {
        return Err(ClientError::NoAnswer);
    }
    let resp = decode_response(answer.as_bytes())?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ClientError::Refused(
            resp.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}

/// Sends a streaming request (`trace`) and hands each line after the `ok` response to
/// `on_line` until the agent closes the stream or `on_line` returns false.
pub fn stream(
    path: &Path,
    req: &Request,
    mut on_line: impl FnMut(serde_json::Value) -> bool,
) -> Result<(), ClientError> {
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    (&stream).write_all(&encode_line(req)?)?;
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    if reader.read_line(&mut answer)? == 0 {
        return Err(ClientError::NoAnswer);
    }
    let resp = decode_response(answer.as_bytes())?;
    if !resp.ok {
        return Err(ClientError::Refused(
            resp.error.unwrap_or_else(|| "unknown error".into()),
        ));
    }
    loop {
        answer.clear();
        if reader.read_line(&mut answer)? == 0 {
            return Ok(());
        }
        if !on_line(serde_json::from_str(&answer)?) {
            return Ok(());
        }
    }
}
