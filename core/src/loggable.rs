//! Client-supplied text made safe for a log line (PROTOCOL.md §15).

/// Bytes of `device_name` kept in a log line.
pub const DEVICE_NAME_MAX: usize = 32;
/// Bytes of `binary_version` kept in a log line.
pub const BINARY_VERSION_MAX: usize = 64;

/// Keeps the first `max` bytes of `text` and replaces every byte outside `0x20`–`0x7E` with `?`,
/// so a client cannot forge log lines or smuggle control sequences into them.
pub fn loggable(text: &str, max: usize) -> String {
    text.bytes()
        .take(max)
        .map(|b| {
            if (0x20..=0x7e).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_and_replaces_item_71() {
        assert_eq!(loggable("Pixel 8", DEVICE_NAME_MAX), "Pixel 8");
        assert_eq!(loggable("a\nb\u{1b}[31mé", DEVICE_NAME_MAX), "a?b?[31m??");
        assert_eq!(loggable(&"x".repeat(40), DEVICE_NAME_MAX).len(), 32);
        assert_eq!(loggable(&"v".repeat(100), BINARY_VERSION_MAX).len(), 64);
    }
}
