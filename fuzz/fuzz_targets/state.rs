#![no_main]
//! The persisted pod table: one pod file, and the legacy single-file table migrated on start.
use libfuzzer_sys::fuzz_target;
use sluice_agent::state::{PodRecord, decode_legacy, decode_record, encode_record};

fuzz_target!(|data: &[u8]| {
    match decode_record(data) {
        Ok(pod) => round_trip(&pod),
        Err(e) => assert!(!e.is_empty()),
    }
    match decode_legacy(data) {
        // Migration writes each legacy record as a pod file: nothing may be lost.
        Ok(pods) => pods.iter().for_each(round_trip),
        Err(e) => assert!(!e.is_empty()),
    }
});

fn round_trip(pod: &PodRecord) {
    let bytes = encode_record(pod).expect("a decoded record encodes");
    assert_eq!(
        &decode_record(&bytes).expect("an encoded record decodes"),
        pod
    );
}
