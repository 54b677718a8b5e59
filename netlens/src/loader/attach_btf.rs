//! The BTF aya is handed to load the BTF-typed programs (tp_btf, fentry,
//! fexit).
//!
//! aya 0.14 takes a parsed `Btf` for those loads only to find one type id
//! each (the `btf_trace_NAME` typedef of a tracepoint, a function), by a
//! scan of every type of that kind that turns each name into a `String`;
//! the kernel then checks the program against its own BTF, given that id.
//! aya's full parse of the kernel's BTF and its scans were about a seventh
//! of start-up's CPU (perf, 5 starts). So aya gets a stand-in: a BTF whose
//! types are all pointers to void, except the programs' targets, each at
//! the id it has in the kernel's BTF (from netlens's own index). aya's scan
//! then compares a handful of names and finds the kernel's ids.

use aya::{Btf, Endianness};
use aya_obj::btf::{BtfType, Func, FuncLinkage};

use crate::kernel::btf::KernelBtf;

use super::hooks::{Attach, Hook};

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_LEN: u32 = 24;
const KIND_PTR: u32 = 2;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;
/// `BTF_FUNC_GLOBAL`, a function's linkage (in `vlen`); aya reads it.
const LINKAGE_GLOBAL: u32 = 1;

/// What aya looks up to load `hook`: (kind, name), `None` for a program
/// aya loads without BTF.
fn target(hook: &Hook) -> Option<(u32, String)> {
    match hook.attach {
        Attach::Btf => Some((KIND_TYPEDEF, format!("btf_trace_{}", hook.target))),
        Attach::FEntry | Attach::FExit => Some((KIND_FUNC, hook.target.to_string())),
        _ => None,
    }
}

/// A BTF holding `hooks`' targets at their ids in `kernel`; targets the
/// kernel lacks are left out (aya then fails their loads, as with the
/// kernel's own BTF).
pub fn for_hooks<'a>(kernel: &KernelBtf, hooks: impl Iterator<Item = &'a Hook>) -> Option<Btf> {
    let mut targets: Vec<(u32, u32, String)> = hooks
        .filter_map(target)
        .filter_map(|(kind, name)| {
            let id = match kind {
                KIND_TYPEDEF => kernel.typedef_id(&name)?,
                _ => kernel.function_id(&name)?,
            };
            Some((id, kind, name))
        })
        .collect();
    targets.sort();
    targets.dedup_by_key(|(id, _, _)| *id);
    // aya makes a typedef only by parsing one, and its parse allocates for
    // every type (12-16 ms for the 114,653 ids of 6.18's last target). So
    // the parse stops at the last typedef (38,292 there); the functions
    // after it, and the placeholders between them, are added as values.
    let parsed = targets.iter().rposition(|(_, kind, _)| *kind == KIND_TYPEDEF).map_or(0, |last| last + 1);
    let mut btf = Btf::parse(&encode(&targets[..parsed]), Endianness::default()).ok()?;
    let mut next_id = targets[..parsed].last().map_or(1, |(id, _, _)| id + 1);
    for (id, _, name) in &targets[parsed..] {
        for _ in next_id..*id {
            btf.add_type(BtfType::Unknown);
        }
        let name_offset = btf.add_string(name);
        btf.add_type(BtfType::Func(Func::new(name_offset, 0, FuncLinkage::Global)));
        next_id = id + 1;
    }
    Some(btf)
}

/// The BTF bytes: type `id` of each target is that target, every other
/// id up to the last a pointer to void.
fn encode(targets: &[(u32, u32, String)]) -> Vec<u8> {
    let last = targets.last().map_or(0, |(id, _, _)| *id);
    let mut strings = vec![0u8];
    let mut types = Vec::with_capacity(last as usize * 12);
    let mut push = |name_off: u32, info: u32, size_or_type: u32| {
        for word in [name_off, info, size_or_type] {
            types.extend_from_slice(&word.to_ne_bytes());
        }
    };
    let mut next = targets.iter().peekable();
    for id in 1..=last {
        match next.next_if(|(target_id, _, _)| *target_id == id) {
            Some((_, kind, name)) => {
                let name_off = strings.len() as u32;
                strings.extend_from_slice(name.as_bytes());
                strings.push(0);
                let vlen = if *kind == KIND_FUNC { LINKAGE_GLOBAL } else { 0 };
                push(name_off, kind << 24 | vlen, 0);
            }
            None => push(0, KIND_PTR << 24, 0),
        }
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN as usize + types.len() + strings.len());
    bytes.extend_from_slice(&BTF_MAGIC.to_ne_bytes());
    bytes.extend_from_slice(&[1, 0]); // version, flags
    for word in [HEADER_LEN, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
        bytes.extend_from_slice(&word.to_ne_bytes()); // hdr_len, type_off, type_len, str_off, str_len
    }
    bytes.extend_from_slice(&types);
    bytes.extend_from_slice(&strings);
    bytes
}

#[cfg(test)]
mod tests {
    use aya_obj::btf::BtfKind;

    use super::*;
    use crate::loader::hooks::HOOKS;
    use crate::optional;

    /// Every BTF-typed hook's target gets the id aya finds in its own parse
    /// of this machine's kernel BTF.
    #[test]
    fn stand_in_gives_the_kernel_ids() {
        let Ok(kernel) = KernelBtf::load() else { return };
        let Ok(full) = Btf::from_sys_fs() else { return };
        let hooks: Vec<&Hook> = HOOKS.iter().chain(optional::all_hooks()).collect();
        let stand_in = for_hooks(&kernel, hooks.iter().copied()).expect("the stand-in parses");
        let mut compared = 0;
        for hook in hooks {
            let Some((kind, name)) = target(hook) else { continue };
            let kind = if kind == KIND_TYPEDEF { BtfKind::Typedef } else { BtfKind::Func };
            let expected = full.id_by_type_name_kind(&name, kind).ok();
            assert_eq!(stand_in.id_by_type_name_kind(&name, kind).ok(), expected, "{name}");
            compared += usize::from(expected.is_some());
        }
        assert!(compared >= 5, "only {compared} targets found in this kernel's BTF");
    }
}
