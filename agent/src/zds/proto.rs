//! ztunnel's ZDS messages (package `istio.workload.zds`), declared with prost's derive macros:
//! the schema is small and fixed, and this avoids a protoc build step. Field numbers are the
//! wire contract (docs/zds.md).

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

/// Sent by ztunnel right after connecting; not answered.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Carries exactly one fd (the pod's netns) as SCM_RIGHTS.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct SnapshotSent {}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "workload_request::Payload", tags = "1, 2, 3, 5")]
    pub payload: Option<workload_request::Payload>,
}

pub mod workload_request {
    #[derive(Clone, PartialEq, ::prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
    }
}

/// An empty `error` is an ACK, anything else a NACK.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

pub mod workload_response {
    #[derive(Clone, PartialEq, ::prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Bytes as protoc encodes them for the upstream schema.
    #[test]
    fn field_numbers_match_the_wire_contract() {
        let add = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: "u".into(),
                workload_info: Some(WorkloadInfo {
                    name: "n".into(),
                    namespace: "s".into(),
                    service_account: "a".into(),
                }),
            })),
        };
        // field 1 (add), len 14: field 1 (uid) "u", field 2 (info) len 9: 1:"n" 2:"s" 3:"a"
        assert_eq!(
            add.encode_to_vec(),
            [
                0x0a, 14, 0x0a, 1, b'u', 0x12, 9, 0x0a, 1, b'n', 0x12, 1, b's', 0x1a, 1, b'a'
            ]
        );
        let del = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: "u".into(),
            })),
        };
        assert_eq!(del.encode_to_vec(), [0x12, 3, 0x12, 1, b'u']);
        let keep = WorkloadRequest {
            payload: Some(workload_request::Payload::Keep(KeepWorkload {
                uid: "u".into(),
            })),
        };
        assert_eq!(keep.encode_to_vec(), [0x2a, 3, 0x0a, 1, b'u']);
        let snap = WorkloadRequest {
            payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snap.encode_to_vec(), [0x1a, 0]);
        assert_eq!(
            ZdsHello {
                version: Version::V1 as i32
            }
            .encode_to_vec(),
            [0x08, 1]
        );
        let nack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: "x".into() })),
        };
        assert_eq!(nack.encode_to_vec(), [0x0a, 3, 0x0a, 1, b'x']);
    }
}
