//! A map of the object, read and written through its fd with `&self`: enrollments on several
//! threads update the maps at once, each update being atomic in the kernel.
use std::{
    marker::PhantomData,
    os::fd::{AsFd, OwnedFd},
};

use aya::{Ebpf, maps::Map};

use super::{Error, bpf_sys, error::is_enoent};

pub(super) struct Table<K, V> {
    name: &'static str,
    fd: OwnedFd,
    _kv: PhantomData<fn(K) -> V>,
}

impl<K: aya::Pod, V: aya::Pod> Table<K, V> {
    /// Takes map `name` out of the loaded object.
    pub fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, Error> {
        let map = ebpf.take_map(name).ok_or(Error::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let data = match &map {
            Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::Array(d)
            | Map::SockHash(d)
            | Map::PerCpuArray(d)
            | Map::RingBuf(d) => d,
            _ => {
                return Err(Error::Map {
                    name,
                    source: aya::maps::MapError::InvalidName { name: name.into() },
                });
            }
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::Io {
                what: format!("duplicating the fd of {name}"),
                source,
            })?;
        Ok(Table {
            name,
            fd,
            _kv: PhantomData,
        })
    }

    fn err(&self, source: std::io::Error) -> Error {
        Error::Io {
            what: format!("eBPF map {}", self.name),
            source,
        }
    }

    pub fn get(&self, key: &K) -> Result<Option<V>, Error> {
        bpf_sys::map_lookup(self.fd.as_fd(), key).map_err(|e| self.err(e))
    }

    pub fn put(&self, key: &K, value: &V) -> Result<(), Error> {
        bpf_sys::map_update(self.fd.as_fd(), key, value).map_err(|e| self.err(e))
    }

    /// Removes `key`; a missing key is fine.
    pub fn delete(&self, key: &K) -> Result<(), Error> {
        bpf_sys::map_delete(self.fd.as_fd(), key).map_err(|e| self.err(e))
    }

    pub fn keys(&self) -> Result<Vec<K>, Error> {
        bpf_sys::map_keys(self.fd.as_fd()).map_err(|e| self.err(e))
    }

    /// Entries in use (0 if the map cannot be read): a few batched reads for hash maps; a walk
    /// key by key only for map types without batch lookups (the sockhash).
    pub fn count(&self) -> usize {
        match bpf_sys::map_count_batched::<K, V>(self.fd.as_fd()) {
            Ok(Some(n)) => n,
            Ok(None) => self.keys().map(|k| k.len()).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Key and value of every entry (entries removed meanwhile are skipped).
    pub fn entries(&self) -> Result<Vec<(K, V)>, Error> {
        let mut out = Vec::new();
        for k in self.keys()? {
            match self.get(&k) {
                Ok(Some(v)) => out.push((k, v)),
                Ok(None) => {}
                Err(Error::Io { source, .. }) if is_enoent(&source) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}
