//! Map operations aya does not expose for hash maps.

use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Looks `key` up in the map and deletes it, under the bucket's lock
/// (BPF_MAP_LOOKUP_AND_DELETE_ELEM; hash maps have it since 5.14): the
/// value returned is the one deleted, whatever the programs wrote before.
/// `None` where the key is absent.
pub fn lookup_and_delete<K: Pod, V: Pod>(map: BorrowedFd<'_>, key: &K) -> std::io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    // SAFETY: bpf_attr is plain old data; zero is a valid value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the map-element member of the union, all of it written.
    let element = unsafe { &mut attr.__bindgen_anon_2 };
    element.map_fd = map.as_raw_fd() as u32;
    element.key = key as *const K as u64;
    element.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
    // SAFETY: attr names a live key and a value buffer of the map's sizes
    // (K and V are the map's key and value types).
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM as libc::c_long, &mut attr, size_of::<bpf_attr>())
    };
    if rc == 0 {
        // SAFETY: the kernel wrote the whole value; V is plain old data.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(err)
}
