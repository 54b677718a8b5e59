//! Short names the kernel hands over in fixed 16-byte fields.

/// A name as the kernel keeps it in 16 NUL-padded bytes (a process's comm,
/// `TASK_COMM_LEN`; a congestion control's, `TCP_CA_NAME_MAX`), held
/// inline: decoding an event allocates nothing. Reads as a `&str`; bytes
/// that are not UTF-8 read as U+FFFD replacement characters cut to fit.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShortName {
    bytes: [u8; 16],
    len: u8,
}

impl ShortName {
    /// The name in `raw` (up to its first NUL); `None` when empty.
    pub fn from_bytes(raw: &[u8]) -> Option<Self> {
        let raw = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        if raw.is_empty() {
            return None;
        }
        let mut comm = Self { bytes: [0; 16], len: 0 };
        // Nearly every name is ASCII: checked as words, with no call.
        if raw.is_ascii() && raw.len() <= comm.bytes.len() {
            comm.bytes[..raw.len()].copy_from_slice(raw);
            comm.len = raw.len() as u8;
            return Some(comm);
        }
        match std::str::from_utf8(raw) {
            // At most 16 bytes: it fits.
            Ok(text) => {
                comm.push(text);
            }
            Err(_) => {
                for c in String::from_utf8_lossy(raw).chars() {
                    if !comm.push(c.encode_utf8(&mut [0; 4])) {
                        break;
                    }
                }
            }
        }
        Some(comm)
    }

    /// Appends `text` if it fits whole; says whether it did.
    fn push(&mut self, text: &str) -> bool {
        let (at, end) = (self.len as usize, self.len as usize + text.len());
        if end > self.bytes.len() {
            return false;
        }
        self.bytes[at..end].copy_from_slice(text.as_bytes());
        self.len = end as u8;
        true
    }
}

impl std::ops::Deref for ShortName {
    type Target = str;
    /// Read on every event by every view (keys, filters, output): checked
    /// again here, the check was 8 % of `top`'s time under churn (perf).
    fn deref(&self) -> &str {
        let text = &self.bytes[..self.len as usize];
        debug_assert!(std::str::from_utf8(text).is_ok());
        // SAFETY: `bytes[..len]` only ever holds whole `&str`s, appended by
        // `push`, so it is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(text) }
    }
}

impl std::fmt::Debug for ShortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::fmt::Display for ShortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::ShortName;

    /// A comm fills all 16 bytes without a NUL at most; bytes that are not
    /// UTF-8 become replacement characters, cut at a whole character.
    #[test]
    fn short_names_read_as_text_without_allocating() {
        assert_eq!(ShortName::from_bytes(b"\0junk"), None);
        assert_eq!(ShortName::from_bytes(b"nginx\0\0\0").as_deref(), Some("nginx"));
        assert_eq!(ShortName::from_bytes(b"0123456789abcdef").as_deref(), Some("0123456789abcdef"));
        // 'a' then 15 invalid bytes: U+FFFD is 3 bytes, so 5 of them fit.
        let mut raw = [0xffu8; 16];
        raw[0] = b'a';
        assert_eq!(ShortName::from_bytes(&raw).as_deref(), Some("a\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}"));
    }
}
