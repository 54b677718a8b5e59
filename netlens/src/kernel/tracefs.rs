//! Tracepoint record layouts, read from tracefs `format` files.

use std::{collections::HashMap, ffi::CString, fs, path::{Path, PathBuf}};

use anyhow::{anyhow, bail, Context as _, Result};

const MOUNT_POINTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Where tracefs is mounted, mounting it at /sys/kernel/tracing if it is not.
pub fn ensure_mounted() -> Result<PathBuf> {
    if let Some(found) = MOUNT_POINTS.iter().map(Path::new).find(|p| p.join("events").is_dir()) {
        return Ok(found.to_path_buf());
    }
    let target = Path::new(MOUNT_POINTS[0]);
    let c_target = CString::new(MOUNT_POINTS[0])?;
    let fstype = CString::new("tracefs")?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(fstype.as_ptr(), c_target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 || !target.join("events").is_dir() {
        bail!(
            "tracefs is not mounted and mounting it at {} failed ({}); run `mount -t tracefs tracefs {}`",
            target.display(),
            std::io::Error::last_os_error(),
            target.display()
        );
    }
    Ok(target.to_path_buf())
}

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u16,
    pub size: u16,
}

/// The fields of one tracepoint's record, by name.
#[derive(Debug, Default)]
pub struct Format {
    pub event: String,
    fields: HashMap<String, Field>,
}

impl Format {
    /// Reads `events/CATEGORY/NAME/format` under the tracefs mount.
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self> {
        let path = tracefs.join("events").join(category).join(name).join("format");
        let text = fs::read_to_string(&path).with_context(|| {
            format!("tracepoint {category}:{name} is missing ({} unreadable); this kernel lacks it", path.display())
        })?;
        Self::parse(&format!("{category}:{name}"), &text)
    }

    /// Parses the text of a `format` file.
    pub fn parse(event: &str, text: &str) -> Result<Self> {
        let mut fields = HashMap::new();
        for line in text.lines().map(str::trim).filter(|l| l.starts_with("field:")) {
            let mut decl = None;
            let (mut offset, mut size) = (None, None);
            for part in line.split(';').map(str::trim) {
                if let Some(rest) = part.strip_prefix("field:") {
                    decl = Some(rest);
                } else if let Some(rest) = part.strip_prefix("offset:") {
                    offset = rest.parse::<u16>().ok();
                } else if let Some(rest) = part.strip_prefix("size:") {
                    size = rest.parse::<u16>().ok();
                }
            }
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                bail!("{event}: cannot parse format line `{line}`");
            };
            // "const void * skaddr", "__u8 saddr[4]": the name is the last
            // word, without any array suffix.
            let name = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .unwrap_or(decl)
                .split('[')
                .next()
                .unwrap_or("");
            fields.insert(name.to_string(), Field { offset, size });
        }
        Ok(Self { event: event.to_string(), fields })
    }

    /// The offset of `name`, which must exist and have `size` bytes.
    pub fn offset(&self, name: &str, size: u16) -> Result<u16> {
        let field = self.fields.get(name).ok_or_else(|| {
            anyhow!("tracepoint {} has no field `{name}`; this kernel's layout is not supported", self.event)
        })?;
        if field.size != size {
            bail!("tracepoint {}: field `{name}` has {} bytes, expected {size}", self.event, field.size);
        }
        Ok(field.offset)
    }

    /// Bytes from the record's start to the end of its last field; the
    /// programs copy the record in one read of at most
    /// `netlens_common::RECORD_MAX` bytes.
    pub fn record_len(&self) -> Result<u16> {
        let len = self.fields.values().map(|f| f.offset + f.size).max().unwrap_or(0);
        if len as usize > netlens_common::RECORD_MAX {
            bail!("tracepoint {} has a {len}-byte record, more than the {} netlens reads", self.event, netlens_common::RECORD_MAX);
        }
        Ok(len)
    }

    /// The offset of `name` if this kernel's record has it.
    pub fn optional_offset(&self, name: &str, size: u16) -> Result<Option<u16>> {
        match self.fields.contains_key(name) {
            true => self.offset(name, size).map(Some),
            false => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;

print fmt: \"family=%s\"";

    #[test]
    fn parses_pointer_array_and_enum_fields() {
        let format = Format::parse("sock:inet_sock_set_state", SET_STATE).unwrap();
        assert_eq!(format.offset("skaddr", 8).unwrap(), 8);
        assert_eq!(format.offset("oldstate", 4).unwrap(), 16);
        assert_eq!(format.offset("saddr_v6", 16).unwrap(), 40);
        assert_eq!(format.offset("reason", 4).unwrap(), 28);
        assert_eq!(format.optional_offset("err", 4).unwrap(), None);
        assert_eq!(format.record_len().unwrap(), 56);
    }

    #[test]
    fn wrong_size_or_missing_field_is_an_error() {
        let format = Format::parse("sock:inet_sock_set_state", SET_STATE).unwrap();
        assert!(format.offset("oldstate", 2).unwrap_err().to_string().contains("4 bytes"));
        assert!(format.offset("newstate", 4).unwrap_err().to_string().contains("no field"));
    }
}
