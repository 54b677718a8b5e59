//! The programs' casts, relocated here because aya cannot.
//!
//! A BTF tracepoint hands its programs a `struct sock *`; the members they
//! read are a `struct tcp_sock`'s. The `bpf_skc_to_tcp_sock` helper makes
//! one, at the cost of a helper call (10–25 ns per run here, measured by
//! `cargo xtask bench cost`) on every run of every typed program. Since
//! 6.2 the `bpf_rdonly_cast` kfunc does the same, for any struct, with no
//! call at all: the verifier rewrites it into a register move. The typed accept
//! program uses it too, to walk `file` → `socket` → `sock` with plain
//! loads instead of probe reads. But a kfunc call names the function by its
//! BTF id in the running kernel, which the loader must write into the
//! instruction, and aya 0.14 has no such relocation.
//!
//! So the programs call a placeholder helper id, `CAST_CALL`, and the
//! object is rewritten before aya parses it: every call of that id in its
//! code sections becomes a kfunc call of `bpf_rdonly_cast` where the kernel
//! has it, else a call of `bpf_skc_to_tcp_sock` (the programs take that
//! path only for `struct tcp_sock`; see `CAST_CALL`). The instruction's size
//! and place are unchanged, so nothing else in the object (relocations,
//! line info) moves.
//!
//! The same pass takes the compare-and-exchanges out where flows do not
//! live in the array of slots (the eBPF crate's slots.rs, their only
//! user): before 5.12 the verifier refuses a program that holds one
//! anywhere, even on a path the frozen config rules out ("BPF_STX uses
//! reserved fields"). Each becomes `r0 = r0`, on that dead path.

use anyhow::{bail, Context as _, Result};
use netlens_common::CAST_CALL;
use object::{Object as _, ObjectSection as _, SectionKind};

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// A call's source register for a kfunc (`BPF_PSEUDO_KFUNC_CALL`).
const PSEUDO_KFUNC_CALL: u8 = 2;
/// `BPF_FUNC_skc_to_tcp_sock`.
const SKC_TO_TCP_SOCK: i32 = 137;
/// `BPF_STX | BPF_ATOMIC | BPF_DW`, and the immediate of its
/// compare-and-exchange (`BPF_CMPXCHG`, which fetches).
const ATOMIC_DW: u8 = 0xdb;
const CMPXCHG: i32 = 0xf1;
/// `BPF_ALU64 | BPF_MOV | BPF_X` with both registers r0: `r0 = r0`.
const MOV_R0_R0: [u8; 8] = [0xbf, 0, 0, 0, 0, 0, 0, 0];

/// What the placeholder call becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cast {
    /// `bpf_rdonly_cast`, by its BTF id in the running kernel.
    Kfunc { btf_id: u32 },
    /// `bpf_skc_to_tcp_sock`.
    Helper,
}

impl Cast {
    /// `function_id`: the kfunc's BTF id where the kernel has it and the
    /// programs were told `struct tcp_sock`'s (both or neither: the
    /// offsets are resolved so).
    pub fn choose(function_id: Option<u32>, tcp_sock_btf_id: u32) -> Self {
        match function_id {
            Some(btf_id) if tcp_sock_btf_id != 0 => Cast::Kfunc { btf_id },
            _ => Cast::Helper,
        }
    }

    /// As `check` names it.
    pub fn describe(self) -> &'static str {
        match self {
            Cast::Kfunc { .. } => "bpf_rdonly_cast kfunc (no call at run time)",
            Cast::Helper => "bpf_skc_to_tcp_sock helper",
        }
    }
}

/// `object` with every placeholder call in its code rewritten to `cast`,
/// and without compare-and-exchanges unless `keep_cmpxchg`; in a buffer
/// aligned for the ELF parser. Fails when it holds no placeholder: the
/// programs and this loader would not agree.
pub fn rewrite(object: &[u8], cast: Cast, keep_cmpxchg: bool) -> Result<AlignedObject> {
    let code: Vec<(usize, usize)> = {
        let file = object::File::parse(object).context("parsing the eBPF object")?;
        file.sections()
            .filter(|section| section.kind() == SectionKind::Text)
            .filter_map(|section| section.file_range())
            .map(|(start, size)| (start as usize, size as usize))
            .collect()
    };
    let mut aligned = AlignedObject::copy_of(object);
    let bytes = aligned.bytes_mut();
    let mut rewritten = 0;
    for (start, size) in code {
        let Some(section) = bytes.get_mut(start..start + size) else { continue };
        rewritten += rewrite_calls(section, cast);
        if !keep_cmpxchg {
            remove_cmpxchg(section);
        }
    }
    if rewritten == 0 {
        bail!("the eBPF object has no placeholder cast to rewrite (built from other sources than this loader?)");
    }
    Ok(aligned)
}

/// Rewrites the placeholder calls among `code`'s 8-byte instructions;
/// returns how many.
fn rewrite_calls(code: &mut [u8], cast: Cast) -> usize {
    let mut rewritten = 0;
    for insn in code.chunks_exact_mut(8) {
        // code, dst/src registers, offset (2), immediate (4), little-endian.
        let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
        if insn[0] != CALL || insn[1] != 0 || imm != CAST_CALL as i32 {
            continue;
        }
        let (src_reg, imm) = match cast {
            Cast::Kfunc { btf_id } => (PSEUDO_KFUNC_CALL, btf_id as i32),
            Cast::Helper => (0, SKC_TO_TCP_SOCK),
        };
        insn[1] = src_reg << 4;
        // The kfunc's BTF is vmlinux's: offset 0.
        insn[2..4].copy_from_slice(&0u16.to_le_bytes());
        insn[4..8].copy_from_slice(&imm.to_le_bytes());
        rewritten += 1;
    }
    rewritten
}

/// Turns `code`'s compare-and-exchanges into `r0 = r0`; returns how many.
fn remove_cmpxchg(code: &mut [u8]) -> usize {
    let mut removed = 0;
    for insn in code.chunks_exact_mut(8) {
        let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
        if insn[0] == ATOMIC_DW && imm == CMPXCHG {
            insn.copy_from_slice(&MOV_R0_R0);
            removed += 1;
        }
    }
    removed
}

/// An object's bytes, 8-byte aligned (the ELF parser reads its headers in
/// place).
pub struct AlignedObject {
    words: Vec<u64>,
    len: usize,
}

impl AlignedObject {
    fn copy_of(object: &[u8]) -> Self {
        let mut words = vec![0u64; object.len().div_ceil(8)];
        let mut aligned = Self { words: Vec::new(), len: object.len() };
        // SAFETY: `words` holds at least `object.len()` bytes, and any
        // bytes are a valid u64.
        unsafe { std::ptr::copy_nonoverlapping(object.as_ptr(), words.as_mut_ptr().cast::<u8>(), object.len()) };
        aligned.words = words;
        aligned
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes of the buffer, which holds at least that many.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u8, regs: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut bytes = [code, regs, 0, 0, 0, 0, 0, 0];
        bytes[2..4].copy_from_slice(&off.to_le_bytes());
        bytes[4..8].copy_from_slice(&imm.to_le_bytes());
        bytes
    }

    fn program() -> Vec<u8> {
        [
            insn(0xbf, 0x16, 0, 0),                             // r6 = r1
            insn(CALL, 0, 0, CAST_CALL as i32),        // the placeholder
            insn(CALL, 0, 0, 5),                                // bpf_ktime_get_ns
            insn(CALL, 0x10, 0, CAST_CALL as i32),     // a BPF-to-BPF call, not ours
            insn(0x18, 0, 0, CAST_CALL as i32),        // a constant that only looks like it
            insn(CALL, 0, 0, CAST_CALL as i32),
            insn(0x95, 0, 0, 0),                                // exit
        ]
        .concat()
    }

    #[test]
    fn placeholder_calls_become_kfunc_calls_of_vmlinux() {
        let mut code = program();
        assert_eq!(rewrite_calls(&mut code, Cast::Kfunc { btf_id: 81_234 }), 2);
        assert_eq!(&code[8..16], &insn(CALL, 0x20, 0, 81_234));
        assert_eq!(&code[40..48], &insn(CALL, 0x20, 0, 81_234));
        // Everything else as it was.
        let original = program();
        for at in [0, 16, 24, 32, 48] {
            assert_eq!(code[at..at + 8], original[at..at + 8], "instruction at {at}");
        }
    }

    #[test]
    fn placeholder_calls_become_helper_calls() {
        let mut code = program();
        assert_eq!(rewrite_calls(&mut code, Cast::Helper), 2);
        assert_eq!(&code[8..16], &insn(CALL, 0, 0, SKC_TO_TCP_SOCK));
    }

    #[test]
    fn the_kfunc_needs_the_struct_id_too() {
        assert_eq!(Cast::choose(Some(7), 9), Cast::Kfunc { btf_id: 7 });
        assert_eq!(Cast::choose(Some(7), 0), Cast::Helper);
        assert_eq!(Cast::choose(None, 9), Cast::Helper);
    }

    #[test]
    fn the_embedded_object_has_placeholders_in_its_code() {
        let rewritten = rewrite(super::super::EBPF_OBJECT, Cast::Helper, true).expect("rewrite");
        assert_eq!(rewritten.bytes().len(), super::super::EBPF_OBJECT.len());
    }

    #[test]
    fn only_compare_and_exchanges_are_removed() {
        let xadd = insn(0xc3, 0x21, 0, 0); // lock *(u32 *)(r1 + 0) += r2
        let cmpxchg = insn(ATOMIC_DW, 0x21, 0, CMPXCHG);
        let mut code = [program(), xadd.to_vec(), cmpxchg.to_vec()].concat();
        assert_eq!(remove_cmpxchg(&mut code), 1);
        assert_eq!(code[..56], program()[..]);
        assert_eq!(code[56..64], xadd[..]);
        assert_eq!(code[64..72], MOV_R0_R0);
    }

    /// The array of slots claims with one (slots.rs in the eBPF crate).
    #[test]
    fn the_embedded_object_has_compare_and_exchanges() {
        let file = object::File::parse(super::super::EBPF_OBJECT).expect("the embedded object parses");
        let found: usize = file
            .sections()
            .filter(|section| section.kind() == SectionKind::Text)
            .filter_map(|section| section.data().ok().map(<[u8]>::to_vec))
            .map(|mut code| remove_cmpxchg(&mut code))
            .sum();
        assert!(found > 0);
    }

    /// The object is embedded without its DWARF (build.rs), with the BTF
    /// the programs load with.
    #[test]
    fn the_embedded_object_has_btf_and_no_dwarf() {
        let file = object::File::parse(super::super::EBPF_OBJECT).expect("the embedded object parses");
        let names: Vec<&str> = file.sections().filter_map(|section| section.name().ok()).collect();
        assert!(names.contains(&".BTF") && names.contains(&".BTF.ext"), "sections: {names:?}");
        assert!(!names.iter().any(|name| name.contains(".debug")), "sections: {names:?}");
        assert!(super::super::EBPF_OBJECT.len() < 1 << 20, "{} bytes", super::super::EBPF_OBJECT.len());
    }
}
