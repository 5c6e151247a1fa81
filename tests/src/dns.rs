//! Just enough DNS wire format to send a query and recognise its answer.

/// Offset of the flags byte that holds the QR ("this is a response") bit.
const FLAGS_HI: usize = 2;
const QR_BIT: u8 = 0x80;
const HEADER_LEN: usize = 12;

/// A standard recursive query for `name` with the given record type (1 = A).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut msg = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&[0x01, 0x00]); // RD set
    msg.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT=1, others 0
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let label = &label.as_bytes()[..label.len().min(63)];
        msg.push(label.len() as u8);
        msg.extend_from_slice(label);
    }
    msg.push(0);
    msg.extend_from_slice(&qtype.to_be_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes()); // class IN
    msg
}

/// Turns a query into a (minimal) response by setting QR; short messages are left alone.
pub fn mark_response(msg: &mut [u8]) {
    if let Some(flags) = msg.get_mut(FLAGS_HI) {
        *flags |= QR_BIT;
    }
}

/// True when `reply` answers the query with this `id`.
pub fn is_response_to(reply: &[u8], id: u16) -> bool {
    reply.len() >= HEADER_LEN && reply[..2] == id.to_be_bytes() && reply[FLAGS_HI] & QR_BIT != 0
}

/// A random query id, so concurrent tests never match each other's replies.
pub fn random_id() -> u16 {
    let mut buf = [0u8; 2];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != 2 {
        // Not security relevant: fall back to something that still varies per call.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return (nanos ^ std::process::id()) as u16;
    }
    u16::from_ne_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_round_trip() {
        let mut q = query(0xbeef, "example.com", 1);
        assert_eq!(&q[12..25], b"\x07example\x03com\x00");
        assert!(!is_response_to(&q, 0xbeef));
        mark_response(&mut q);
        assert!(is_response_to(&q, 0xbeef));
        assert!(!is_response_to(&q, 0xbeee));
        assert!(!is_response_to(&q[..5], 0xbeef));
    }
}
