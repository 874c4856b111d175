//! The benchmark payload: the publisher's message index and its send time.
//!
//! A payload is ASCII text `INDEX:SENT_NS:` padded with `.` to the requested
//! size, so it is a valid JSON string without escapes, a msgpack `str`, and a
//! NATS payload alike, and a subscriber can read it without a full parse.

/// Writes the payload for message `index` sent at `sent_ns`, padded to `size`
/// bytes (longer when `size` is too small for the header).
pub fn encode(index: u64, sent_ns: u64, size: usize, out: &mut Vec<u8>) {
    let start = out.len();
    push_decimal(index, out);
    out.push(b':');
    push_decimal(sent_ns, out);
    out.push(b':');
    let written = out.len() - start;
    if written < size {
        out.resize(start + size, b'.');
    }
}

/// Reads `(index, sent_ns)` from the start of a payload.
pub fn decode(payload: &[u8]) -> Option<(u64, u64)> {
    let (index, rest) = take_decimal(payload)?;
    let rest = rest.strip_prefix(b":")?;
    let (sent_ns, rest) = take_decimal(rest)?;
    rest.strip_prefix(b":")?;
    Some((index, sent_ns))
}

/// The smallest payload that holds a header of this index and a current timestamp.
pub fn header_len(max_index: u64) -> usize {
    decimal_len(max_index) + decimal_len(u64::MAX / 4) + 2
}

fn decimal_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 10 {
        value /= 10;
        len += 1;
    }
    len
}

fn push_decimal(value: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut pos = digits.len();
    let mut rest = value;
    loop {
        pos -= 1;
        digits[pos] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[pos..]);
}

/// Parses leading ASCII digits; returns the value and the rest of the input.
pub fn take_decimal(input: &[u8]) -> Option<(u64, &[u8])> {
    let digits = input.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for &b in &input[..digits] {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((value, &input[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let mut buf = Vec::new();
        encode(42, 123_456_789, 64, &mut buf);
        assert_eq!(buf.len(), 64);
        assert!(buf.iter().all(|b| b.is_ascii()));
        assert_eq!(decode(&buf), Some((42, 123_456_789)));
    }

    #[test]
    fn short_size_keeps_header() {
        let mut buf = Vec::new();
        encode(7, 99, 1, &mut buf);
        assert_eq!(buf, b"7:99:");
        assert_eq!(decode(&buf), Some((7, 99)));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode(b"abc"), None);
        assert_eq!(decode(b"1:2"), None);
        assert_eq!(decode(b""), None);
    }
}
