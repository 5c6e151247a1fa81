//! Command line of `sluice-testkit peer`.

use std::path::PathBuf;

pub const USAGE: &str = "sluice-testkit peer [--tag NAME] \
    [--zds SOCKET [--nack-uid UID]... [--retry-connect]]";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerArgs {
    pub tag: Option<String>,
    /// Set with `--zds`: act as ztunnel towards the agent's socket.
    pub zds: Option<ZdsArgs>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZdsArgs {
    pub socket: PathBuf,
    /// NACK the first Add of each of these uids.
    pub nack_uids: Vec<String>,
    /// Retry while the socket is missing at start instead of exiting.
    pub retry_connect: bool,
}

/// Parses the arguments after `peer`.
pub fn parse(args: &[String]) -> Result<PeerArgs, String> {
    let mut tag = None;
    let mut socket = None;
    let mut nack_uids = Vec::new();
    let mut retry_connect = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--tag" => tag = Some(value()?),
            "--zds" => socket = Some(PathBuf::from(value()?)),
            "--nack-uid" => nack_uids.push(value()?),
            "--retry-connect" => retry_connect = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let zds = match socket {
        Some(socket) => Some(ZdsArgs {
            socket,
            nack_uids,
            retry_connect,
        }),
        None if !nack_uids.is_empty() || retry_connect => {
            return Err("--nack-uid and --retry-connect need --zds".into());
        }
        None => None,
    };
    Ok(PeerArgs { tag, zds })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_both_modes() {
        assert_eq!(parse(&[]).unwrap(), PeerArgs::default());
        assert_eq!(parse(&args("--tag t")).unwrap().tag.as_deref(), Some("t"));
        let p = parse(&args(
            "--zds /s --nack-uid a --tag t --nack-uid b --retry-connect",
        ))
        .unwrap();
        assert_eq!(p.tag.as_deref(), Some("t"));
        assert_eq!(
            p.zds,
            Some(ZdsArgs {
                socket: "/s".into(),
                nack_uids: vec!["a".into(), "b".into()],
                retry_connect: true,
            })
        );
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(parse(&args("--zds")).is_err());
        assert!(parse(&args("--nack-uid a")).is_err());
        assert!(parse(&args("--bogus")).is_err());
    }
}
