//! Telling a network-namespace fd from any other fd.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)` from `<linux/nsfs.h>` (Linux ≥ 4.11).
const NS_GET_NSTYPE: u32 = 0xb703;

/// The `CLONE_NEW*` type of the namespace `fd` refers to; an error for non-namespace fds.
pub fn namespace_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only inspects the fd.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// True when `fd` is a network namespace (what every AddWorkload must carry).
pub fn is_netns(fd: BorrowedFd<'_>) -> bool {
    namespace_type(fd).is_ok_and(|t| t == libc::CLONE_NEWNET)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn recognises_netns_and_rejects_others() {
        let net = File::open("/proc/self/ns/net").unwrap();
        assert!(is_netns(net.as_fd()));
        let uts = File::open("/proc/self/ns/uts").unwrap();
        assert_eq!(namespace_type(uts.as_fd()).unwrap(), libc::CLONE_NEWUTS);
        assert!(!is_netns(uts.as_fd()));
        let null = File::open("/dev/null").unwrap();
        assert!(!is_netns(null.as_fd()));
    }
}
