//! The kernel's BTF as bytes, for [`super::KernelBtf`].

use std::{fs, ops::Deref};

use super::VMLINUX;

/// The BTF's bytes: mapped where the kernel allows it (6.16 and later), else
/// read. sysfs hands `vmlinux` out 4 KiB per read(): ~1,350 reads, ~6 ms,
/// against 0.2 ms for the mapping. aya's parse for the BTF programs
/// reads these bytes too ([`super::KernelBtf::bytes`]), not the file again.
pub(super) enum Bytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Read(data) => data,
        }
    }
}

impl Bytes {
    pub(super) fn of_vmlinux() -> std::io::Result<Self> {
        let file = fs::File::open(VMLINUX)?;
        // SAFETY: a private, read-only mapping of the kernel's BTF, which
        // the kernel never changes while it runs.
        match unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) } {
            // A size of 0 is a sysfs file that does not say its size: read it.
            Ok(map) if !map.is_empty() => Ok(Bytes::Mapped(map)),
            // Before 6.16 sysfs does not map it.
            _ => fs::read(VMLINUX).map(Bytes::Read),
        }
    }
}
