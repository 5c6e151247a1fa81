#![no_main]
//! The node's CNI configuration files, as the installer chains sluice-cni into them and takes
//! it out again.
//!
//! Input: byte 0 picks the kind (`.conf` or `.conflist`), the rest is the file.
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice_agent::{
    cni::config::PluginOptions,
    cni_install::{
        Installer,
        conflist::{Kind, chain, has_any_entry, unchain},
    },
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, file)) = data.split_first() else {
        return;
    };
    let kind = if which & 1 == 0 {
        Kind::Conf
    } else {
        Kind::ConfList
    };
    let installer = Installer::new(
        Path::new("/etc/cni/net.d"),
        Path::new("/opt/cni/bin"),
        Path::new("/sluice-cni"),
        &PluginOptions::default(),
    );
    let entry = installer.entry();
    match chain(kind, file, entry) {
        Ok(Some(out)) => {
            // Chained once is chained for good, and unchaining takes out only our entry.
            assert_eq!(chain(Kind::ConfList, &out, entry), Ok(None));
            assert!(has_any_entry(Kind::ConfList, &out));
            let bare = unchain(Kind::ConfList, &out)
                .expect("a chained file unchains")
                .expect("a chained file has our entry");
            assert!(!has_any_entry(Kind::ConfList, &bare));
            assert_eq!(chain(Kind::ConfList, &bare, entry), Ok(Some(out)));
        }
        Ok(None) => assert_eq!(kind, Kind::ConfList),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    match unchain(kind, file) {
        Ok(Some(out)) => assert!(!has_any_entry(Kind::ConfList, &out)),
        Ok(None) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
