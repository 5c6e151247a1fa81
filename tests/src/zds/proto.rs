//! Package `istio.workload.zds`, written by hand from the wire facts in docs/zds.md (no
//! protoc, no build script) so that a field-number mistake in the agent shows up here as
//! a mismatch instead of being shared.

/// Sent by ztunnel right after connecting; the agent does not reply.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

/// Field 4 is reserved upstream.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Carries exactly one fd (the pod's netns) as SCM_RIGHTS.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// Note the field number: the uid is field 2, not 1.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SnapshotSent {}

/// Agent → ztunnel, one per SEQPACKET packet.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "workload_request::Payload", tags = "1, 2, 3, 5")]
    pub payload: Option<workload_request::Payload>,
}

pub mod workload_request {
    #[derive(Clone, PartialEq, Eq, prost::Oneof)]
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

/// ztunnel → agent, exactly one per request.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

pub mod workload_response {
    #[derive(Clone, PartialEq, Eq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

/// An empty `error` means OK; anything else is a NACK.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

#[cfg(test)]
mod tests {
    //! Expected bytes are spelled out by hand (tag byte = field << 3 | wire type 2) so
    //! these tests check the field numbers, not just that prost round-trips.

    use prost::Message;

    use super::workload_request::Payload;
    use super::*;

    fn request(p: Payload) -> Vec<u8> {
        WorkloadRequest { payload: Some(p) }.encode_to_vec()
    }

    #[test]
    fn hello_is_field_1_varint() {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);
    }

    #[test]
    fn add_with_info() {
        let add = Payload::Add(AddWorkload {
            uid: "u".into(),
            workload_info: Some(WorkloadInfo {
                name: "n".into(),
                namespace: "s".into(),
                service_account: "a".into(),
            }),
        });
        let wi = [0x0a, 1, b'n', 0x12, 1, b's', 0x1a, 1, b'a'];
        let mut inner = vec![0x0a, 1, b'u', 0x12, wi.len() as u8];
        inner.extend_from_slice(&wi);
        let mut expected = vec![0x0a, inner.len() as u8];
        expected.extend_from_slice(&inner);
        assert_eq!(request(add.clone()), expected);
        assert_eq!(
            WorkloadRequest::decode(&expected[..]).unwrap().payload,
            Some(add)
        );
    }

    #[test]
    fn del_uid_is_field_2_of_request_field_2() {
        let del = Payload::Del(DelWorkload { uid: "u".into() });
        assert_eq!(request(del), [0x12, 3, 0x12, 1, b'u']);
    }

    #[test]
    fn snapshot_is_field_3_and_keep_is_field_5() {
        assert_eq!(request(Payload::SnapshotSent(SnapshotSent {})), [0x1a, 0]);
        let keep = Payload::Keep(KeepWorkload { uid: "u".into() });
        assert_eq!(request(keep), [0x2a, 3, 0x0a, 1, b'u']);
    }

    #[test]
    fn ack_and_nack() {
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack::default())),
        };
        assert_eq!(ack.encode_to_vec(), [0x0a, 0]);
        let nack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: "e".into() })),
        };
        assert_eq!(nack.encode_to_vec(), [0x0a, 3, 0x0a, 1, b'e']);
    }

    #[test]
    fn unknown_payload_field_decodes_to_none() {
        // Field 4 is not part of the oneof; prost skips it, leaving no payload.
        let req = WorkloadRequest::decode(&[0x22, 0][..]).unwrap();
        assert_eq!(req.payload, None);
    }
}
