//! The BTF index against a hand-built blob, and against this kernel's.

use super::*;

/// Builds a BTF blob: `struct outer { int a; union { int b; struct inner
/// c; }; }` with `struct inner { int x; int y; }`, and `enum flags { F0,
/// F1 }`.
fn sample() -> Vec<u8> {
    let strings = b"\0int\0outer\0a\0b\0c\0inner\0x\0y\0flags\0F0\0F1\0bits\0lo\0hi\0MIB_A\0MIB_B\0";
    let name = |s: &str| -> u32 {
        let needle = format!("\0{s}\0");
        strings.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
    };
    let mut types = Vec::new();
    let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_le_bytes()));
    let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
    // 1: int (4 bytes)
    push(&[name("int"), info(KIND_INT, 0), 4, 32]);
    // 2: struct inner { int x @0; int y @32 }
    push(&[name("inner"), info(KIND_STRUCT, 2), 8, name("x"), 1, 0, name("y"), 1, 32]);
    // 3: anonymous union { int b; struct inner c; }
    push(&[0, info(KIND_UNION, 2), 8, name("b"), 1, 0, name("c"), 2, 0]);
    // 4: struct outer { int a @0; union @64 }
    push(&[name("outer"), info(KIND_STRUCT, 2), 16, name("a"), 1, 0, 0, 3, 64]);
    // 5: enum flags { F0 = 0, F1 = 1 }
    push(&[name("flags"), info(KIND_ENUM, 2), 4, name("F0"), 0, name("F1"), 1]);
    // 6: struct bits { int lo:5; int hi:3; } (kind_flag: sizes in the offsets)
    push(&[name("bits"), (1 << 31) | info(KIND_STRUCT, 2), 4, name("lo"), 1, 5 << 24, name("hi"), 1, (3 << 24) | 5]);
    // 7: enum { MIB_A = 0, MIB_B = 23 }, without a name
    push(&[0, info(KIND_ENUM, 2), 4, name("MIB_A"), 0, name("MIB_B"), 23]);
    let mut blob = Vec::new();
    for word in [0x0001_eb9fu32, 24, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
        blob.extend_from_slice(&word.to_le_bytes());
    }
    blob.extend_from_slice(&types);
    blob.extend_from_slice(strings);
    blob
}

#[test]
fn resolves_nested_and_anonymous_members() {
    let btf = KernelBtf::parse(sample()).unwrap();
    assert_eq!(btf.offset("outer", "a").unwrap(), 0);
    assert_eq!(btf.offset("outer", "b").unwrap(), 8);
    assert_eq!(btf.offset("outer", "c.y").unwrap(), 12);
    assert_eq!(btf.offset("inner", "y").unwrap(), 4);
    assert_eq!(btf.enum_value("flags", "F1").unwrap(), 1);
    assert_eq!(btf.enum_members("flags").unwrap(), [("F0".to_string(), 0), ("F1".to_string(), 1)]);
    assert_eq!(btf.anonymous_enum_value("MIB_B"), Some(23));
    assert_eq!(btf.anonymous_enum_value("F1"), None, "F1 is a named enum's");
    assert_eq!(btf.anonymous_enum_value("MIB_C"), None);
}

#[test]
fn sizes_and_bitfields_are_checked() {
    let btf = KernelBtf::parse(sample()).unwrap();
    assert_eq!(btf.sized_offset("inner", "y", 4).unwrap(), 4);
    assert_eq!(btf.sized_offset("outer", "c", 8).unwrap(), 8);
    let err = btf.sized_offset("inner", "y", 8).unwrap_err().to_string();
    assert!(err.contains("is 4 bytes on this kernel, netlens reads 8"), "{err}");
    assert_eq!(btf.bitfield("bits", "lo").unwrap(), (0, 0, 5));
    assert_eq!(btf.bitfield("bits", "hi").unwrap(), (0, 5, 3));
    assert!(btf.offset("bits", "hi").is_err(), "a bitfield has no byte offset");
}

#[test]
fn missing_things_are_errors_not_zero() {
    let btf = KernelBtf::parse(sample()).unwrap();
    assert!(btf.offset("outer", "z").is_err());
    assert!(btf.offset("nosuch", "a").is_err());
    assert_eq!(btf.optional_offset("outer", "c.z"), None);
    assert!(btf.enum_value("flags", "F9").is_err());
    assert!(KernelBtf::parse(vec![0; 8]).is_err());
}

#[test]
fn reads_this_kernels_tcp_sock_when_present() {
    if !std::path::Path::new(VMLINUX).exists() {
        return;
    }
    let btf = KernelBtf::load().unwrap();
    // Offsets differ per kernel; they must exist and be distinct.
    let srtt = btf.offset("tcp_sock", "srtt_us").unwrap();
    let retrans = btf.offset("tcp_sock", "total_retrans").unwrap();
    assert_ne!(srtt, retrans);
    assert!(btf.offset("sock", "__sk_common.skc_net.net").is_ok());
    for (name, member) in [("sk_buff", "head"), ("sk_buff", "transport_header"), ("sk_buff", "_skb_refdst"), ("dst_entry", "dev")] {
        assert!(btf.offset(name, member).is_ok(), "{name}.{member}: {:?}", btf.offset(name, member));
    }
    assert!(btf.anonymous_enum_value("LINUX_MIB_LISTENOVERFLOWS").is_some());
    assert!(btf.offset("net", "mib.net_statistics").is_ok());
    assert!(btf.offset("bpf_array", "pptrs").is_ok());
    let kfree_skb = btf.raw_tracepoint_args("kfree_skb").unwrap();
    assert_eq!(kfree_skb.first().map(String::as_str), Some("struct sk_buff *"), "{kfree_skb:?}");
}
