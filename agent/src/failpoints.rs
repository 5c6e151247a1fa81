//! Fault injection for tests, compiled in only with the `failpoints` feature (the agent that
//! `cargo xtask test` runs has it; release builds do not). `FAILPOINTS="name=return(arg);..."`
//! activates a point; the code at that point decides what its argument means.
//!
//! | point              | argument        | effect                                           |
//! |--------------------|-----------------|--------------------------------------------------|
//! | `state-put`        | a phase, `any`  | writing a pod record in that phase fails         |
//! | `enroll-pause`     | `<uid>:<ms>`    | that pod's enrollment (`*`: every one) stops for `ms` before the dataplane step |

/// The argument of the active failpoint `name`, if any.
pub fn arg(name: &str) -> Option<String> {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |a| a.unwrap_or_default())
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        None
    }
}

/// `enroll-pause`: waits here if the point names this pod.
pub fn pause_enroll(uid: &str) {
    let Some(arg) = arg("enroll-pause") else {
        return;
    };
    let Some((who, ms)) = arg.split_once(':') else {
        return;
    };
    if who == uid || who == "*" {
        let ms: u64 = ms.parse().unwrap_or(0);
        tracing::info!(uid, ms, "failpoint enroll-pause: pausing");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
