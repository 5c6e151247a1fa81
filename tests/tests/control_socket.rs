//! The control socket as a client meets it: whatever a line holds, the agent answers it (or
//! says why it hangs up) and keeps serving.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde_json::Value;
use sluice_tests::agent_proc::AgentFixture;

const TESTKIT: &str = env!("CARGO_BIN_EXE_sluice-testkit");

/// Sends `line` and reads one answer line on `conn`.
fn ask(conn: &mut BufReader<UnixStream>, line: &[u8]) -> Value {
    conn.get_mut().write_all(line).unwrap();
    let mut answer = String::new();
    assert_ne!(
        conn.read_line(&mut answer).unwrap(),
        0,
        "no answer to {line:?}"
    );
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn bad_lines_get_an_answer_saying_why_and_the_connection_goes_on() {
    let Some(fx) = AgentFixture::start_if_privileged(Path::new(TESTKIT), 0, &[]) else {
        return;
    };
    let stream = UnixStream::connect(&fx.agent.paths.control).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut conn = BufReader::new(stream);
    // Not UTF-8: before the fix the agent hung up without a word.
    let bad = ask(&mut conn, b"{\"op\":\"unenroll\",\"uid\":\"\xff\"}\n");
    assert_eq!(bad["ok"], false, "{bad}");
    let error = bad["error"].as_str().unwrap();
    assert!(
        error.starts_with("malformed request: invalid unicode"),
        "{error}"
    );
    let garbage = ask(&mut conn, b"not json\n");
    assert_eq!(garbage["ok"], false, "{garbage}");
    assert!(
        garbage["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed request")
    );
    // The same connection still serves requests.
    let pong = ask(&mut conn, b"{\"op\":\"ping\"}\n");
    assert_eq!(pong, serde_json::json!({"ok": true, "result": "pong"}));

    // A line longer than any request (64 KiB) is refused, then the agent hangs up.
    let refused = ask(&mut conn, &vec![b' '; 64 * 1024 + 1]);
    assert_eq!(refused["error"], "request too long", "{refused}");
    let mut rest = String::new();
    match conn.read_line(&mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection stayed open: {other:?} {rest:?}"),
    }
    // The agent itself is unaffected.
    assert_eq!(fx.agent.status().unwrap()["ready"], true);
}
