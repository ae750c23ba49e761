//! The part of AMF0 an RTMP publisher speaks, decoded with a depth limit.
//!
//! Our own decoder rather than `rml_amf0`: that crate recurses once per nesting level without a
//! limit, so a 20 KB object nested 5,000 deep overflows the stack and aborts the whole process
//! (`catch_unwind` cannot catch that). Here nesting is bounded by [`MAX_DEPTH`], and every count
//! read from the wire is only trusted as far as the input really has bytes for it (nothing is
//! allocated from a declared count), so the work is linear in the message length, which the
//! caller caps.

/// Deepest nesting of objects and arrays we decode. Publishers send flat command objects
/// (depth 1); metadata, if anything, nests once more.
pub const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Boolean(bool),
    String(String),
    /// Objects and ECMA arrays, properties in wire order.
    Object(Vec<(String, Value)>),
    Null,
    Undefined,
    StrictArray(Vec<Value>),
    Date(f64),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_number(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// The first property named `name` of an object.
    pub fn property(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Object(props) => props.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Amf0Error {
    #[error("AMF0 value truncated")]
    Truncated,
    #[error("AMF0 nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("AMF0 type marker {0:#04x} is not accepted")]
    UnsupportedType(u8),
    #[error("AMF0 string is not UTF-8")]
    NotUtf8,
}

const OBJECT_END: u8 = 0x09;

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Amf0Error> {
        if self.rest.len() < n {
            return Err(Amf0Error::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Amf0Error> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Amf0Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, Amf0Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn f64(&mut self) -> Result<f64, Amf0Error> {
        let b = self.take(8)?;
        Ok(f64::from_be_bytes(
            b.try_into().map_err(|_| Amf0Error::Truncated)?,
        ))
    }

    fn string(&mut self, len: usize) -> Result<String, Amf0Error> {
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| Amf0Error::NotUtf8)
    }

    /// Properties until the empty-name end marker.
    fn properties(&mut self, depth: usize) -> Result<Vec<(String, Value)>, Amf0Error> {
        let mut props = Vec::new();
        loop {
            let len = usize::from(self.u16()?);
            if len == 0 {
                if self.u8()? == OBJECT_END {
                    return Ok(props);
                }
                return Err(Amf0Error::Truncated);
            }
            let key = self.string(len)?;
            let value = self.value(depth + 1)?;
            props.push((key, value));
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, Amf0Error> {
        let marker = self.u8()?;
        // Containers open a level; the check comes before reading anything inside them.
        if matches!(marker, 0x03 | 0x08 | 0x0A) && depth >= MAX_DEPTH {
            return Err(Amf0Error::TooDeep);
        }
        Ok(match marker {
            0x00 => Value::Number(self.f64()?),
            0x01 => Value::Boolean(self.u8()? != 0),
            0x02 => {
                let len = usize::from(self.u16()?);
                Value::String(self.string(len)?)
            }
            0x03 => Value::Object(self.properties(depth)?),
            0x05 => Value::Null,
            0x06 => Value::Undefined,
            0x08 => {
                // The declared count is only a hint (and a lie costs nothing): the end marker
                // decides.
                self.u32()?;
                Value::Object(self.properties(depth)?)
            }
            0x0A => {
                let count = self.u32()?;
                let mut items = Vec::new();
                for _ in 0..count {
                    items.push(self.value(depth + 1)?);
                }
                Value::StrictArray(items)
            }
            0x0B => {
                let ms = self.f64()?;
                self.take(2)?; // time zone, unused by the format's own definition
                Value::Date(ms)
            }
            0x0C => {
                let len = usize::try_from(self.u32()?).map_err(|_| Amf0Error::Truncated)?;
                Value::String(self.string(len)?)
            }
            // References, typed objects, XML, movie clips, record sets and the AMF3 switch: no
            // publisher needs them in a command, so they are refused rather than half-supported.
            other => return Err(Amf0Error::UnsupportedType(other)),
        })
    }
}

/// Decodes every value of a message body.
pub fn decode_all(bytes: &[u8]) -> Result<Vec<Value>, Amf0Error> {
    let mut reader = Reader { rest: bytes };
    let mut values = Vec::new();
    while !reader.rest.is_empty() {
        values.push(reader.value(0)?);
    }
    Ok(values)
}

/// Appends the encoding of `value` (only what our responses use: no depth concern, we build
/// them).
pub fn encode(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Number(n) => {
            out.push(0x00);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Boolean(b) => out.extend_from_slice(&[0x01, u8::from(*b)]),
        Value::String(s) => encode_string(s, out),
        Value::Object(props) => {
            out.push(0x03);
            for (k, v) in props {
                encode_key(k, out);
                encode(v, out);
            }
            out.extend_from_slice(&[0, 0, OBJECT_END]);
        }
        Value::Null => out.push(0x05),
        Value::Undefined => out.push(0x06),
        Value::StrictArray(items) => {
            out.push(0x0A);
            out.extend_from_slice(&u32::try_from(items.len()).unwrap_or(u32::MAX).to_be_bytes());
            for v in items {
                encode(v, out);
            }
        }
        Value::Date(ms) => {
            out.push(0x0B);
            out.extend_from_slice(&ms.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
    }
}

fn encode_string(s: &str, out: &mut Vec<u8>) {
    match u16::try_from(s.len()) {
        Ok(len) => {
            out.push(0x02);
            out.extend_from_slice(&len.to_be_bytes());
        }
        Err(_) => {
            out.push(0x0C);
            out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
        }
    }
    out.extend_from_slice(s.as_bytes());
}

fn encode_key(k: &str, out: &mut Vec<u8>) {
    // Keys are ours and short; a longer one would be cut, never mis-framed.
    let k = &k.as_bytes()[..k.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&u16::try_from(k.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(k);
}

/// An object from `(key, value)` pairs, for building responses.
pub fn object<const N: usize>(props: [(&str, Value); N]) -> Value {
    Value::Object(props.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

pub fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_what_publishers_send() {
        let values = vec![
            string("connect"),
            Value::Number(1.0),
            object([
                ("app", string("live")),
                ("type", string("nonprivate")),
                ("fpad", Value::Boolean(false)),
                ("nested", object([("x", Value::Null)])),
            ]),
            Value::StrictArray(vec![Value::Undefined, Value::Date(5.0)]),
            Value::String("é".repeat(40_000)),
        ];
        let mut bytes = Vec::new();
        for v in &values {
            encode(v, &mut bytes);
        }
        assert_eq!(decode_all(&bytes).unwrap(), values);
        assert_eq!(
            values[2].property("app").and_then(Value::as_str),
            Some("live")
        );
    }

    #[test]
    fn ecma_array_count_is_not_trusted() {
        // ECMA array claiming 4 billion entries, holding one.
        let mut bytes = vec![0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0, 1, b'a', 0x05, 0, 0, 0x09];
        assert_eq!(
            decode_all(&bytes).unwrap(),
            vec![object([("a", Value::Null)])]
        );
        // A strict array claiming 4 billion entries with none there ends at the input's end.
        bytes = vec![0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x05];
        assert_eq!(decode_all(&bytes), Err(Amf0Error::Truncated));
    }

    #[test]
    fn depth_and_types_are_limited() {
        let mut ok = Vec::new();
        for _ in 0..MAX_DEPTH {
            ok.extend_from_slice(&[0x03, 0, 1, b'a']);
        }
        ok.push(0x05);
        ok.extend(std::iter::repeat_n([0u8, 0, 0x09], MAX_DEPTH).flatten());
        assert!(decode_all(&ok).is_ok());
        let too_deep = [&[0x03, 0, 1, b'a'][..], &ok].concat();
        assert_eq!(decode_all(&too_deep), Err(Amf0Error::TooDeep));
        assert_eq!(
            decode_all(&[0x11, 0x01]),
            Err(Amf0Error::UnsupportedType(0x11))
        );
        assert_eq!(
            decode_all(&[0x07, 0, 0]),
            Err(Amf0Error::UnsupportedType(0x07))
        );
        assert_eq!(
            decode_all(&[0x02, 0, 2, 0xFF, 0xFE]),
            Err(Amf0Error::NotUtf8)
        );
        assert_eq!(decode_all(&[0x00, 1, 2]), Err(Amf0Error::Truncated));
    }
}
