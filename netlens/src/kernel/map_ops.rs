//! Map operations aya does not expose for hash maps.

use std::{
    ops::ControlFlow,
    os::fd::{AsRawFd, BorrowedFd},
};

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

/// Visits the map's entries, `chunk` of them a syscall: BPF_MAP_LOOKUP_BATCH
/// (hash maps have it since 5.6) copies out up to `chunk` keys and values
/// at once, where aya's iterator makes two syscalls an entry (the next key,
/// then its value): 4,000 a refresh for `top` with 2,000 connections. As
/// with that walk, an entry added or removed meanwhile may be seen or not.
/// `visit` stops the walk with `Break`. `Err` where the kernel refuses the
/// command.
pub fn for_each_entry<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    chunk: usize,
    mut visit: impl FnMut(&K, &V) -> ControlFlow<()>,
) -> std::io::Result<()> {
    let mut chunk = chunk.max(1);
    // SAFETY (both): K and V are plain old data; zero is a valid value.
    let mut keys: Vec<K> = (0..chunk).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut values: Vec<V> = (0..chunk).map(|_| unsafe { std::mem::zeroed() }).collect();
    // Where the walk stands: for hash maps, a bucket index (a u32) the
    // kernel hands back and takes again; none on the first call.
    let (mut cursor, mut next) = (0u64, 0u64);
    let mut started = false;
    loop {
        // SAFETY: bpf_attr is plain old data; zero is a valid value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the batch member of the union, all of it written.
        let batch = unsafe { &mut attr.batch };
        batch.in_batch = if started { &cursor as *const u64 as u64 } else { 0 };
        batch.out_batch = &mut next as *mut u64 as u64;
        batch.keys = keys.as_mut_ptr() as u64;
        batch.values = values.as_mut_ptr() as u64;
        batch.count = chunk as u32;
        batch.map_fd = map.as_raw_fd() as u32;
        // SAFETY: attr names buffers of `chunk` keys and values of the
        // map's sizes (K and V are the map's key and value types) and two
        // cursors of at least the 4 bytes a hash map's takes.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long, &mut attr, size_of::<bpf_attr>()) };
        let err = (rc != 0).then(std::io::Error::last_os_error);
        // SAFETY: the kernel wrote back how many entries it copied.
        let copied = (unsafe { attr.batch.count } as usize).min(chunk);
        for (key, value) in keys[..copied].iter().zip(&values[..copied]) {
            if visit(key, value).is_break() {
                return Ok(());
            }
        }
        match err.as_ref().and_then(std::io::Error::raw_os_error) {
            None => {
                cursor = next;
                started = true;
            }
            // The last entries came with this call.
            Some(libc::ENOENT) => return Ok(()),
            // One bucket holds more entries than `chunk`: ask again for
            // more at once, from the same place.
            Some(libc::ENOSPC) if copied == 0 => {
                chunk *= 2;
                keys.resize_with(chunk, || unsafe { std::mem::zeroed() });
                values.resize_with(chunk, || unsafe { std::mem::zeroed() });
            }
            Some(_) => return Err(err.unwrap_or_else(std::io::Error::last_os_error)),
        }
    }
}
