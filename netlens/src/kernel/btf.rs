//! Kernel struct member offsets from the running kernel's BTF.
//!
//! A small reader of the BTF wire format (include/uapi/linux/btf.h) rather
//! than a general BTF crate: those parse all ~150,000 vmlinux types into
//! owned values up front (230 ms here, most of netlens's start-up), while we
//! need some twenty members. This indexes the types in one pass over the
//! bytes and decodes only what a lookup touches. Named types of the kinds
//! looked up by name are indexed by a hash of (kind, name) in the same pass:
//! scanning all types per lookup cost ~130 ms of netlens's start-up.

mod bytes;

use bytes::Bytes;

use anyhow::{anyhow, bail, Context as _, Result};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Size of `struct btf_type`.
const TYPE_HEADER: usize = 12;

pub struct KernelBtf {
    data: Bytes,
    strings: usize,
    strings_len: usize,
    /// Byte offset of each type's header; index = type id (0 is void).
    /// u32: BTF sections are sized in u32.
    types: Vec<u32>,
    /// (key, id) of the named types of the kinds looked up by name, sorted:
    /// ids with an equal [`name_key`] ascend (collisions are checked on
    /// lookup). A sorted vector: no allocation per type.
    by_name: Vec<(u64, u32)>,
    /// The ids of the enums without a name (the kernel's SNMP counters'
    /// indexes are enumerators of one).
    anonymous_enums: Vec<u32>,
}

/// The kinds [`KernelBtf`] looks up by name.
const NAMED_KINDS: [u32; 5] = [KIND_STRUCT, KIND_ENUM, KIND_TYPEDEF, KIND_FUNC, KIND_UNION];

/// FNV-1a of a type's kind and name: the index key.
fn name_key(kind: u32, name: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ u64::from(kind);
    for &byte in name {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}


/// A struct or union member as found by a lookup.
#[derive(Clone, Copy)]
struct Member {
    bit_offset: u32,
    /// Width of a bitfield member, 0 for an ordinary one.
    bitfield_bits: u32,
    /// The member's type, typedefs and qualifiers stripped.
    header: TypeHeader,
}

/// A decoded `struct btf_type` header.
#[derive(Clone, Copy)]
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
    /// Where the kind-specific data after the header starts.
    body: usize,
}

impl KernelBtf {
    pub fn load() -> Result<Self> {
        let data = Bytes::of_vmlinux().map_err(|err| {
            anyhow!("cannot read kernel BTF at {VMLINUX} ({err}); netlens needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")
        })?;
        Self::index(data).context("parsing kernel BTF")
    }

    pub fn parse(data: Vec<u8>) -> Result<Self> {
        Self::index(Bytes::Read(data))
    }

    /// The raw BTF, as the kernel exports it.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn index(data: Bytes) -> Result<Self> {
        let u32_at = |at: usize| -> Result<u32> {
            let bytes = data.get(at..at + 4).ok_or_else(|| anyhow!("truncated BTF header"))?;
            Ok(u32::from_le_bytes(bytes.try_into()?))
        };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            bail!("not little-endian BTF");
        }
        let header_len = u32_at(4)? as usize;
        let types_start = header_len + u32_at(8)? as usize;
        let types_end = types_start + u32_at(12)? as usize;
        let strings = header_len + u32_at(16)? as usize;
        let strings_len = u32_at(20)? as usize;
        if types_end > data.len() || strings + strings_len > data.len() {
            bail!("BTF sections run past the end of the data");
        }
        // Room for as many types as the section could hold (each at least
        // a header), so neither vector grows by copying itself: reserved
        // pages the index does not fill are never touched (on this kind of
        // VM each new page costs several µs).
        let most_types = (types_end - types_start) / TYPE_HEADER + 1;
        let mut types = Vec::with_capacity(most_types);
        types.push(0);
        let mut btf = Self { data, strings, strings_len, types, by_name: Default::default(), anonymous_enums: Vec::new() };
        let mut at = types_start;
        let mut by_name = Vec::with_capacity(most_types);
        while at < types_end {
            let id = btf.types.len() as u32;
            btf.types.push(at as u32);
            let header = btf.header_at(at)?;
            if header.name_off != 0 && NAMED_KINDS.contains(&header.kind) {
                by_name.push((name_key(header.kind, btf.name(header.name_off)), id));
            } else if header.name_off == 0 && header.kind == KIND_ENUM {
                btf.anonymous_enums.push(id);
            }
            at = header.body + btf.body_len(&header);
        }
        by_name.sort_unstable();
        btf.by_name = by_name;
        Ok(btf)
    }

    fn u32_at(&self, at: usize) -> Result<u32> {
        let bytes = self.data.get(at..at + 4).ok_or_else(|| anyhow!("BTF read past the end"))?;
        Ok(u32::from_le_bytes(bytes.try_into()?))
    }

    fn header_at(&self, at: usize) -> Result<TypeHeader> {
        let info = self.u32_at(at + 4)?;
        Ok(TypeHeader {
            name_off: self.u32_at(at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(at + 8)?,
            body: at + TYPE_HEADER,
        })
    }

    /// Bytes of kind-specific data after a type's header.
    fn body_len(&self, header: &TypeHeader) -> usize {
        match header.kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * header.vlen,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * header.vlen,
            _ => 0,
        }
    }

    fn name(&self, offset: u32) -> &[u8] {
        let start = self.strings + offset as usize;
        let end = self.strings + self.strings_len;
        let tail = self.data.get(start..end).unwrap_or(&[]);
        &tail[..tail.iter().position(|&b| b == 0).unwrap_or(tail.len())]
    }

    fn header(&self, id: u32) -> Result<TypeHeader> {
        let at = *self.types.get(id as usize).ok_or_else(|| anyhow!("BTF type id {id} out of range"))? as usize;
        self.header_at(at)
    }

    /// The types of `kind` named `name`, in id order.
    fn named<'a>(&'a self, name: &'a str, kind: u32) -> impl Iterator<Item = TypeHeader> + 'a {
        self.named_ids(name, kind).map(|(_, header)| header)
    }

    /// The same, with their ids.
    fn named_ids<'a>(&'a self, name: &'a str, kind: u32) -> impl Iterator<Item = (u32, TypeHeader)> + 'a {
        let key = name_key(kind, name.as_bytes());
        let first = self.by_name.partition_point(|&(k, _)| k < key);
        self.by_name[first..].iter().take_while(move |&&(k, _)| k == key).filter_map(move |&(_, id)| {
            let header = self.header(id).ok()?;
            (header.kind == kind && self.name(header.name_off) == name.as_bytes()).then_some((id, header))
        })
    }

    /// The id of function `name`: what a kfunc call names.
    pub fn function_id(&self, name: &str) -> Option<u32> {
        self.named_ids(name, KIND_FUNC).next().map(|(id, _)| id)
    }

    /// The id of typedef `name` (a raw tracepoint's `btf_trace_NAME`).
    pub fn typedef_id(&self, name: &str) -> Option<u32> {
        self.named_ids(name, KIND_TYPEDEF).next().map(|(id, _)| id)
    }

    /// The id of `struct name` (one with members, not a declaration).
    pub fn struct_id(&self, name: &str) -> Option<u32> {
        self.named_ids(name, KIND_STRUCT).find(|(_, header)| header.vlen > 0).map(|(id, _)| id)
    }

    /// The first type of `kind` named `name` (for structs: one with members,
    /// not a forward declaration).
    fn find(&self, name: &str, kind: u32) -> Option<TypeHeader> {
        self.named(name, kind).find(|header| header.vlen > 0)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip(&self, mut id: u32) -> Result<TypeHeader> {
        loop {
            let header = self.header(id)?;
            match header.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = header.size_or_type
                }
                _ => return Ok(header),
            }
        }
    }

    /// Finds member `name` of a struct or union, looking inside anonymous
    /// members; returns it with its bit offset from `parent`'s start.
    fn find_member(&self, parent: &TypeHeader, name: &str) -> Result<Option<Member>> {
        if parent.kind != KIND_STRUCT && parent.kind != KIND_UNION {
            return Ok(None);
        }
        for index in 0..parent.vlen {
            let at = parent.body + 12 * index;
            let member_name = self.name(self.u32_at(at)?);
            let member_type = self.strip(self.u32_at(at + 4)?)?;
            let raw_offset = self.u32_at(at + 8)?;
            // With kind_flag set, the top 8 bits hold a bitfield's size.
            let (bit_offset, bitfield_bits) =
                if parent.kind_flag { (raw_offset & 0xff_ffff, raw_offset >> 24) } else { (raw_offset, 0) };
            if member_name == name.as_bytes() {
                return Ok(Some(Member { bit_offset, bitfield_bits, header: member_type }));
            }
            if member_name.is_empty() {
                if let Some(inner) = self.find_member(&member_type, name)? {
                    return Ok(Some(Member { bit_offset: bit_offset + inner.bit_offset, ..inner }));
                }
            }
        }
        Ok(None)
    }

    /// Member `path` ("a.b.c", members of members) of `struct name`, with
    /// its bit offset from the struct's start. Anonymous structs and unions
    /// along the way are searched.
    fn member(&self, name: &str, path: &str) -> Result<Member> {
        let mut current = self
            .find(name, KIND_STRUCT)
            .ok_or_else(|| anyhow!("kernel BTF has no struct {name}"))?;
        let mut found = None;
        let mut offset_bits = 0;
        for part in path.split('.') {
            let member = self
                .find_member(&current, part)?
                .ok_or_else(|| anyhow!("kernel BTF: struct {name} has no member {path}"))?;
            offset_bits += member.bit_offset;
            current = member.header;
            found = Some(member);
        }
        let member = found.ok_or_else(|| anyhow!("kernel BTF: empty member path for struct {name}"))?;
        Ok(Member { bit_offset: offset_bits, ..member })
    }

    /// Byte offset of `path` inside `struct name`.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32> {
        let member = self.member(name, path)?;
        if member.bitfield_bits != 0 || member.bit_offset % 8 != 0 {
            bail!("kernel BTF: {name}.{path} is a bitfield");
        }
        Ok(member.bit_offset / 8)
    }

    /// Byte offset of `path` inside `struct name`, which must be `size`
    /// bytes: a member whose type changed is refused, not misread.
    pub fn sized_offset(&self, name: &str, path: &str, size: u32) -> Result<u32> {
        let offset = self.offset(name, path)?;
        let member = self.member(name, path)?;
        match self.size_of(&member.header) {
            Some(actual) if actual == size => Ok(offset),
            Some(actual) => bail!(
                "kernel BTF: {name}.{path} is {actual} bytes on this kernel, netlens reads {size}; this kernel's layout is not supported"
            ),
            None => bail!("kernel BTF: {name}.{path} has a type netlens cannot size"),
        }
    }

    /// A bitfield member: the byte that holds it, its shift within that
    /// byte and its width. Refused when it straddles a byte.
    pub fn bitfield(&self, name: &str, path: &str) -> Result<(u32, u8, u8)> {
        let member = self.member(name, path)?;
        let bits = if member.bitfield_bits != 0 { member.bitfield_bits } else { 8 * self.size_of(&member.header).unwrap_or(0) };
        let shift = member.bit_offset % 8;
        if bits == 0 || shift + bits > 8 {
            bail!("kernel BTF: {name}.{path} is not a bitfield within one byte on this kernel");
        }
        Ok((member.bit_offset / 8, shift as u8, bits as u8))
    }

    /// Whether the kernel has a function `name` (a BTF FUNC): what fentry
    /// programs attach to.
    pub fn has_function(&self, name: &str) -> bool {
        self.find_named(name, KIND_FUNC).is_some()
    }

    /// Size in bytes of a (stripped) type, where it has one.
    fn size_of(&self, header: &TypeHeader) -> Option<u32> {
        match header.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => Some(header.size_or_type),
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let element = self.strip(self.u32_at(header.body).ok()?).ok()?;
                Some(self.size_of(&element)? * self.u32_at(header.body + 8).ok()?)
            }
            _ => None,
        }
    }

    /// Like [`Self::offset`], `None` when the kernel lacks the member.
    pub fn optional_offset(&self, name: &str, path: &str) -> Option<u32> {
        self.offset(name, path).ok()
    }

    /// The first type of `kind` named `name`, whatever its vlen.
    fn find_named(&self, name: &str, kind: u32) -> Option<TypeHeader> {
        self.named(name, kind).next()
    }

    /// A type as C spells it, roughly: `struct sock *`, `void *`, `enum x`.
    fn describe(&self, id: u32) -> Result<String> {
        if id == 0 {
            return Ok("void".into());
        }
        let header = self.strip(id)?;
        let name = String::from_utf8_lossy(self.name(header.name_off)).into_owned();
        Ok(match header.kind {
            KIND_PTR => format!("{} *", self.describe(header.size_or_type)?),
            KIND_STRUCT => format!("struct {name}"),
            KIND_UNION => format!("union {name}"),
            KIND_ENUM | KIND_ENUM64 => format!("enum {name}"),
            _ => name,
        })
    }

    /// The parameter types of a function prototype.
    fn params(&self, proto: &TypeHeader) -> Result<Vec<String>> {
        if proto.kind != KIND_FUNC_PROTO {
            bail!("kernel BTF: not a function prototype");
        }
        (0..proto.vlen).map(|index| self.describe(self.u32_at(proto.body + 8 * index + 4)?)).collect()
    }

    /// The arguments a raw tracepoint hands its programs, in order, as
    /// types (the `btf_trace_NAME` prototype without its `void *__data`).
    pub fn raw_tracepoint_args(&self, tracepoint: &str) -> Result<Vec<String>> {
        let name = format!("btf_trace_{tracepoint}");
        let typedef = self.find_named(&name, KIND_TYPEDEF).ok_or_else(|| anyhow!("kernel BTF has no {name}"))?;
        let pointer = self.strip(typedef.size_or_type)?;
        let proto = self.header(pointer.size_or_type)?;
        Ok(self.params(&proto)?.into_iter().skip(1).collect())
    }

    /// The parameter types of kernel function `name`.
    pub fn function_params(&self, name: &str) -> Result<Vec<String>> {
        let func = self.find_named(name, KIND_FUNC).ok_or_else(|| anyhow!("kernel BTF has no function {name}"))?;
        self.params(&self.header(func.size_or_type)?)
    }

    /// The value of enumerator `member` of `enum name`.
    pub fn enum_value(&self, name: &str, member: &str) -> Result<u32> {
        let header = self.find(name, KIND_ENUM).ok_or_else(|| anyhow!("kernel BTF has no enum {name}"))?;
        for index in 0..header.vlen {
            let at = header.body + 8 * index;
            if self.name(self.u32_at(at)?) == member.as_bytes() {
                return self.u32_at(at + 4);
            }
        }
        bail!("kernel BTF: enum {name} has no {member}")
    }

    /// The value of enumerator `member` of an enum without a name.
    pub fn anonymous_enum_value(&self, member: &str) -> Option<u32> {
        self.anonymous_enums.iter().find_map(|&id| {
            let header = self.header(id).ok()?;
            (0..header.vlen).find_map(|index| {
                let at = header.body + 8 * index;
                (self.name(self.u32_at(at).ok()?) == member.as_bytes()).then(|| self.u32_at(at + 4).ok()).flatten()
            })
        })
    }

    /// Every enumerator of `enum name`: (name, value).
    pub fn enum_members(&self, name: &str) -> Result<Vec<(String, u32)>> {
        let header = self.find(name, KIND_ENUM).ok_or_else(|| anyhow!("kernel BTF has no enum {name}"))?;
        (0..header.vlen)
            .map(|index| {
                let at = header.body + 8 * index;
                Ok((String::from_utf8_lossy(self.name(self.u32_at(at)?)).into_owned(), self.u32_at(at + 4)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
