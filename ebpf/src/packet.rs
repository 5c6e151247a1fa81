//! Minimal, bounds-checked parsing of the headers the TC programs look at.
use aya_ebpf::programs::TcContext;
use sluice_common::Addr;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

// IPv6 extension headers we step over (bounded).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const MAX_EXT_HEADERS: usize = 4;

/// A TCP segment's addressing and flags.
pub struct TcpPacket {
    pub v6: bool,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

impl TcpPacket {
    /// A connection request (SYN without ACK).
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    }
}

/// What the TC programs need to know about a packet.
pub enum Parsed {
    Tcp(TcpPacket),
    /// A fragment of a TCP segment: its header may be missing, so it cannot be classified.
    TcpFragment,
    /// The same, in IPv6 (or too many extension headers to tell).
    TcpFragment6,
    Other,
}

/// Parses the packet at `l3` (the network header offset: 14 on Ethernet, 0 on L3 devices).
#[inline(always)]
pub fn parse(ctx: &TcContext, l3: usize) -> Result<Parsed, i64> {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    if proto == ETH_P_IP {
        parse_v4(ctx, l3)
    } else if proto == ETH_P_IPV6 {
        parse_v6(ctx, l3)
    } else {
        Ok(Parsed::Other)
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, l3: usize) -> Result<Parsed, i64> {
    let ver_ihl: u8 = ctx.load(l3)?;
    if ver_ihl >> 4 != 4 {
        return Ok(Parsed::Other);
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Ok(Parsed::Other);
    }
    let proto: u8 = ctx.load(l3 + 9)?;
    if proto != IPPROTO_TCP {
        return Ok(Parsed::Other);
    }
    // More-fragments flag or a fragment offset.
    let frag: u16 = u16::from_be(ctx.load(l3 + 6)?);
    if frag & 0x3fff != 0 {
        return Ok(Parsed::TcpFragment);
    }
    let src: u32 = ctx.load(l3 + 12)?;
    let dst: u32 = ctx.load(l3 + 16)?;
    tcp(ctx, l3 + ihl, false, Addr::v4(src), Addr::v4(dst))
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, l3: usize) -> Result<Parsed, i64> {
    let ver: u8 = ctx.load(l3)?;
    if ver >> 4 != 6 {
        return Ok(Parsed::Other);
    }
    let mut next: u8 = ctx.load(l3 + 6)?;
    let src = Addr::v6(ctx.load::<[u32; 4]>(l3 + 8)?);
    let dst = Addr::v6(ctx.load::<[u32; 4]>(l3 + 24)?);
    let mut off = l3 + 40;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return tcp(ctx, off, true, src, dst),
            NEXTHDR_FRAGMENT => {
                let inner: u8 = ctx.load(off)?;
                return Ok(if inner == IPPROTO_TCP {
                    Parsed::TcpFragment6
                } else {
                    Parsed::Other
                });
            }
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let hdr_len: u8 = ctx.load(off + 1)?;
                next = ctx.load(off)?;
                off += (usize::from(hdr_len) + 1) * 8;
            }
            _ => return Ok(Parsed::Other),
        }
        i += 1;
    }
    // Too many extension headers to tell: treat like a fragment (not passed through unseen).
    Ok(Parsed::TcpFragment6)
}

#[inline(always)]
fn tcp(ctx: &TcContext, l4: usize, v6: bool, src: Addr, dst: Addr) -> Result<Parsed, i64> {
    let sport: u16 = u16::from_be(ctx.load(l4)?);
    let dport: u16 = u16::from_be(ctx.load(l4 + 2)?);
    let flags: u8 = ctx.load(l4 + 13)?;
    Ok(Parsed::Tcp(TcpPacket {
        v6,
        src,
        dst,
        sport,
        dport,
        flags,
    }))
}
