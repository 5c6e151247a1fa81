#![no_main]
//! The control socket's JSON lines, both ways: requests as the agent reads them, responses and
//! the results in them as the CLI and sluice-cni read them.
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sluice_agent::{
    control::api::{self, CniAddReply, CniDelReply, CniGcReply, CniStatusReply, EnrollReply},
    status::Status,
};

fuzz_target!(|line: &[u8]| {
    match api::decode_request(line) {
        Ok(req) => {
            let again = api::decode_request(&api::encode_line(&req).expect("a request encodes"))
                .expect("an encoded request decodes");
            assert_eq!(again, req);
        }
        Err(msg) => assert!(!msg.is_empty()),
    }
    match api::decode_response(line) {
        Ok(resp) => {
            let again = api::decode_response(&api::encode_line(&resp).expect("a response encodes"))
                .expect("an encoded response decodes");
            assert_eq!(again, resp);
            if let Some(result) = &resp.result {
                reply::<EnrollReply>(result);
                reply::<CniAddReply>(result);
                reply::<CniDelReply>(result);
                reply::<CniGcReply>(result);
                reply::<CniStatusReply>(result);
                reply::<Status>(result);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});

/// A result read as `T` (as a client does) encodes to something that reads back the same.
/// Compared as JSON values: not every reply type has `PartialEq`.
fn reply<T: Serialize + DeserializeOwned>(result: &Value) {
    let Ok(t) = serde_json::from_value::<T>(result.clone()) else {
        return;
    };
    let bytes = serde_json::to_vec(&t).expect("a reply encodes");
    let back: T = serde_json::from_slice(&bytes).expect("an encoded reply decodes");
    assert_eq!(
        serde_json::to_value(&back).expect("a reply encodes"),
        serde_json::to_value(&t).expect("a reply encodes")
    );
}
