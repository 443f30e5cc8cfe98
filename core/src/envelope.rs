//! The routing envelope of the binary leg (PROTOCOL.md §7, §8).
//!
//! Phone → binary: the phone's JSON value is copied verbatim into
//! `{"conn_id":"…","frame":<F>}`. Binary → phone: the `frame` value is sliced out of the received
//! buffer, so delivery costs no copy and no re-encoding.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::close::CloseCode;
use crate::id::ConnId;

/// The largest push token accepted (§11).
const MAX_PUSH_TOKEN: usize = 4096;

/// A phone message that is not exactly one JSON value in UTF-8 (§7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson;

/// The bytes every envelope for one phone starts with: `{"conn_id":"<id>","frame":`.
pub(crate) fn frame_prefix(id: &ConnId) -> Bytes {
    let mut out = Vec::with_capacity(id.as_str().len() + 24);
    out.extend_from_slice(br#"{"conn_id":""#);
    id.write_json_escaped(&mut out);
    out.extend_from_slice(br#"","frame":"#);
    Bytes::from(out)
}

/// Wraps one phone message for the binary: `prefix` (from [`frame_prefix`]), the message with
/// outer JSON whitespace trimmed, then `}`. One allocation.
pub fn wrap_phone_frame(prefix: &[u8], message: &[u8]) -> Result<Bytes, NotJson> {
    let text = std::str::from_utf8(message).map_err(|_| NotJson)?;
    // RawValue validates the whole text as one JSON value, iteratively (no depth limit), and
    // borrows the value without its surrounding whitespace.
    let raw: &RawValue = serde_json::from_str(text).map_err(|_| NotJson)?;
    let frame = raw.get().as_bytes();
    let mut out = BytesMut::with_capacity(prefix.len() + frame.len() + 1);
    out.put_slice(prefix);
    out.put_slice(frame);
    out.put_u8(b'}');
    Ok(out.freeze())
}

/// The close notice for a phone that has gone (§8): `{"conn_id":"<id>","close_code":N}`.
pub(crate) fn close_notice(id: &ConnId, code: u16) -> Bytes {
    let mut out = Vec::with_capacity(id.as_str().len() + 36);
    out.extend_from_slice(br#"{"conn_id":""#);
    id.write_json_escaped(&mut out);
    out.extend_from_slice(br#"","close_code":"#);
    out.extend_from_slice(code.to_string().as_bytes());
    out.push(b'}');
    Bytes::from(out)
}

/// Why a binary message was dropped as `malformed` (§7.3 rows 1, 2, 4 and 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not UTF-8 JSON, not an object, or a repeated top-level key.
    NotAnObject,
    /// `conn_id` neither a string nor `null`.
    ConnIdType,
    /// `close_code` neither `null` nor an integer.
    CloseCodeType,
    /// `close_code` an integer not allowed on the wire (and not 0).
    CloseCodeRange,
    /// No `conn_id` and no `push_wake`.
    NoConnId,
    /// No close code and no `frame`.
    NoFrame,
}

/// What one binary message asks for, decided by the first matching row of §7.3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryMessage<'a> {
    /// Rows 6 and 7: deliver `frame` (if any) to the phone `conn_id`, then close it with `close`.
    Deliver {
        conn_id: Cow<'a, str>,
        frame: Option<Bytes>,
        close: Option<CloseCode>,
    },
    /// Row 3 with a valid `push_wake` (§11): the device token.
    PushWake { token: String },
    /// Row 3 with a `push_wake` that fails validation: ignored (logged, no metric).
    PushInvalid,
}

impl<'a> BinaryMessage<'a> {
    /// Decodes one binary message. `data` must be the buffer `text` points into, so that the frame
    /// can be sliced out of it without copying.
    pub fn parse(data: &'a Bytes) -> Result<BinaryMessage<'a>, EnvelopeError> {
        let text = std::str::from_utf8(data).map_err(|_| EnvelopeError::NotAnObject)?;
        let fields =
            serde_json::from_str::<Fields<'a>>(text).map_err(|_| EnvelopeError::NotAnObject)?;
        let conn_id = match fields.conn_id.map(RawValue::get) {
            None | Some("null") => None,
            Some(raw) => Some(json_string(raw).ok_or(EnvelopeError::ConnIdType)?),
        };

        // Row 1 (close_code type) and row 2 (range).
        let close = match fields.close_code.map(RawValue::get) {
            None | Some("null") => None,
            Some(raw) => match parse_integer(raw) {
                None => return Err(EnvelopeError::CloseCodeType),
                Some(0) => None,
                Some(n) => Some(
                    u16::try_from(n)
                        .ok()
                        .and_then(CloseCode::new)
                        .ok_or(EnvelopeError::CloseCodeRange)?,
                ),
            },
        };
        let conn_id = conn_id.filter(|id| !id.is_empty());
        let push = fields.push_wake.filter(|raw| raw.get() != "null");
        let Some(conn_id) = conn_id else {
            // Rows 3 and 4.
            return match push {
                Some(raw) => Ok(parse_push(raw)),
                None => Err(EnvelopeError::NoConnId),
            };
        };
        let frame = fields
            .frame
            .filter(|raw| raw.get() != "null")
            .map(|raw| data.slice_ref(raw.get().as_bytes()));
        if close.is_none() && frame.is_none() {
            return Err(EnvelopeError::NoFrame);
        }
        Ok(BinaryMessage::Deliver {
            conn_id,
            frame,
            close,
        })
    }
}

/// An integer in JSON's number syntax without fraction or exponent, saturated to i64.
fn parse_integer(raw: &str) -> Option<i64> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // An integer too large for i64 is still an integer, just out of range.
    Some(raw.parse::<i64>().unwrap_or(i64::MAX))
}

/// A JSON string literal's value, borrowed unless it has escapes.
fn json_string(raw: &str) -> Option<Cow<'_, str>> {
    if !raw.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(raw) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(raw).ok().map(Cow::Owned),
    }
}

fn parse_push(raw: &RawValue) -> BinaryMessage<'static> {
    #[derive(serde::Deserialize)]
    struct Push<'a> {
        #[serde(borrow)]
        platform: Option<Cow<'a, str>>,
        token: Option<String>,
    }
    match serde_json::from_str::<Push<'_>>(raw.get()) {
        Ok(Push {
            platform: Some(p),
            token: Some(token),
        }) if p == "fcm" && !token.is_empty() && token.len() <= MAX_PUSH_TOKEN => {
            BinaryMessage::PushWake { token }
        }
        _ => BinaryMessage::PushInvalid,
    }
}

/// The top-level keys of a binary message that matter, borrowed from the received text.
#[derive(Default)]
struct Fields<'a> {
    conn_id: Option<&'a RawValue>,
    frame: Option<&'a RawValue>,
    close_code: Option<&'a RawValue>,
    push_wake: Option<&'a RawValue>,
}

impl<'de> de::Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an envelope object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::default();
        // Keys other than the four we read: kept only to detect repeats (rare, so a Vec).
        let mut others: Vec<Cow<'de, str>> = Vec::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.0.as_ref() {
                "conn_id" => set_raw(&mut fields.conn_id, &mut map)?,
                "frame" => set_raw(&mut fields.frame, &mut map)?,
                "close_code" => set_raw(&mut fields.close_code, &mut map)?,
                "push_wake" => set_raw(&mut fields.push_wake, &mut map)?,
                _ => {
                    if others.contains(&key.0) {
                        return Err(de::Error::custom("repeated key"));
                    }
                    map.next_value::<IgnoredAny>()?;
                    others.push(key.0);
                }
            }
        }
        Ok(fields)
    }
}

fn set_raw<'de, A: MapAccess<'de>>(
    slot: &mut Option<&'de RawValue>,
    map: &mut A,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::custom("repeated key"));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

/// An object key, borrowed unless it contains escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Key(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Key(Cow::Owned(v.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{ServerId, Side};

    fn id() -> ConnId {
        ConnId::new(
            Side::Phone,
            &ServerId::parse(b"abc").unwrap(),
            0x0f3a_9c21_d4e5_b687,
        )
    }

    fn wrap(msg: &str) -> Result<String, NotJson> {
        wrap_phone_frame(&frame_prefix(&id()), msg.as_bytes())
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    fn parse(msg: &str) -> Result<BinaryMessage<'static>, EnvelopeError> {
        let data = Bytes::from(msg.to_owned());
        // Own the result so the test can outlive `data`.
        BinaryMessage::parse(&data).map(|m| match m {
            BinaryMessage::Deliver {
                conn_id,
                frame,
                close,
            } => BinaryMessage::Deliver {
                conn_id: Cow::Owned(conn_id.into_owned()),
                frame,
                close,
            },
            BinaryMessage::PushWake { token } => BinaryMessage::PushWake { token },
            BinaryMessage::PushInvalid => BinaryMessage::PushInvalid,
        })
    }

    fn deliver(conn_id: &str, frame: Option<&str>, close: Option<u16>) -> BinaryMessage<'static> {
        BinaryMessage::Deliver {
            conn_id: Cow::Owned(conn_id.to_owned()),
            frame: frame.map(|f| Bytes::from(f.to_owned())),
            close: close.map(|c| CloseCode::new(c).unwrap()),
        }
    }

    #[test]
    fn item_34_envelope_shape() {
        assert_eq!(
            wrap(r#"{"t":"hi"}"#).unwrap(),
            r#"{"conn_id":"client-abc-0f3a9c21d4e5b687","frame":{"t":"hi"}}"#
        );
    }

    #[test]
    fn item_35_frame_bytes_verbatim() {
        let f = r#"{ "b" : "<&>" ,"a":1 }"#;
        assert!(wrap(f).unwrap().contains(&format!(r#""frame":{f}}}"#)));
    }

    #[test]
    fn item_36_trim_and_scalars() {
        assert!(
            wrap(" \t\r\n{\"a\":1}\n ")
                .unwrap()
                .ends_with(r#""frame":{"a":1}}"#)
        );
        for s in ["42", "\"x\"", "true", "null", "-1.5e3", "[]"] {
            assert!(wrap(s).unwrap().ends_with(&format!(":{s}}}")), "{s}");
        }
    }

    #[test]
    fn item_37_not_json() {
        for bad in [
            "",
            "  ",
            "{",
            "{} {}",
            "1 2",
            "tru",
            "{\"a\":1,}",
            "'x'",
            "\"\\q\"",
            "01",
        ] {
            assert_eq!(wrap(bad), Err(NotJson), "{bad:?}");
        }
        assert_eq!(wrap_phone_frame(b"", b"\"\xff\""), Err(NotJson));
    }

    #[test]
    fn deep_nesting_is_only_limited_by_size() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(wrap(&deep).is_ok());
    }

    #[test]
    fn notice_shape_item_49() {
        assert_eq!(
            close_notice(&id(), 1000),
            Bytes::from_static(br#"{"conn_id":"client-abc-0f3a9c21d4e5b687","close_code":1000}"#)
        );
    }

    #[test]
    fn item_39_deliver_slices_frame() {
        let data = Bytes::from_static(br#"{"conn_id":"c","frame": {"t" : "hello"} }"#);
        let BinaryMessage::Deliver {
            frame: Some(frame), ..
        } = BinaryMessage::parse(&data).unwrap()
        else {
            panic!()
        };
        assert_eq!(&frame[..], br#"{"t" : "hello"}"#);
        // The frame shares the received buffer.
        assert!(data.as_ptr_range().contains(&frame.as_ptr()));
    }

    #[test]
    fn item_41_malformed() {
        use EnvelopeError::*;
        for (msg, err) in [
            ("nope", NotAnObject),
            ("[1]", NotAnObject),
            ("\"s\"", NotAnObject),
            (r#"{"frame":1}"#, NoConnId),
            (r#"{"conn_id":null,"frame":1}"#, NoConnId),
            (r#"{"conn_id":"","frame":1}"#, NoConnId),
            (r#"{"conn_id":"c"}"#, NoFrame),
            (r#"{"conn_id":"c","frame":null}"#, NoFrame),
            (r#"{"conn_id":"c","frame":null,"close_code":0}"#, NoFrame),
            (r#"{"conn_id":"c","frame":1,"frame":2}"#, NotAnObject),
            (r#"{"conn_id":"c","frame":1,"x":1,"x":2}"#, NotAnObject),
            (r#"{"conn_id":"c","conn_id":"c","frame":1}"#, NotAnObject),
            (r#"{"CONN_ID":"c","frame":1}"#, NoConnId),
            (r#"{"conn_id":5,"frame":1}"#, ConnIdType),
            (r#"{"conn_id":{},"frame":1}"#, ConnIdType),
            (r#"{"conn_id":"c","frame":1} x"#, NotAnObject),
        ] {
            assert_eq!(parse(msg), Err(err), "{msg}");
        }
    }

    #[test]
    fn item_42_close_code_rules() {
        use EnvelopeError::*;
        for code in [
            "999",
            "1004",
            "1005",
            "1006",
            "1015",
            "5000",
            "-1",
            "99999999999999999999999",
        ] {
            let msg = format!(r#"{{"conn_id":"c","frame":1,"close_code":{code}}}"#);
            assert_eq!(parse(&msg), Err(CloseCodeRange), "{code}");
        }
        for code in ["4000.5", "\"4000\"", "4e3", "true"] {
            let msg = format!(r#"{{"conn_id":"c","frame":1,"close_code":{code}}}"#);
            assert_eq!(parse(&msg), Err(CloseCodeType), "{code}");
        }
    }

    #[test]
    fn item_43_45_directives() {
        assert_eq!(
            parse(r#"{"conn_id":"c","frame":{"a":1},"close_code":0}"#),
            Ok(deliver("c", Some(r#"{"a":1}"#), None))
        );
        assert_eq!(
            parse(r#"{"conn_id":"c","frame":null,"close_code":4401}"#),
            Ok(deliver("c", None, Some(4401)))
        );
        assert_eq!(
            parse(r#"{"conn_id":"c","close_code":4000,"frame":{"t":"bye"},"extra":[1]}"#),
            Ok(deliver("c", Some(r#"{"t":"bye"}"#), Some(4000)))
        );
    }

    #[test]
    fn conn_id_is_unescaped() {
        assert_eq!(
            parse(r#"{"conn_id":"client-a\"b\u0041","frame":1}"#),
            Ok(deliver("client-a\"bA", Some("1"), None))
        );
    }

    #[test]
    fn push_wake_rows() {
        assert_eq!(
            parse(r#"{"push_wake":{"platform":"fcm","token":"t","x":1},"frame":5}"#),
            Ok(BinaryMessage::PushWake { token: "t".into() })
        );
        assert_eq!(
            parse(r#"{"conn_id":"","push_wake":{"platform":"fcm","token":"t"}}"#),
            Ok(BinaryMessage::PushWake { token: "t".into() })
        );
        let long = "t".repeat(4097);
        for bad in [
            r#"{"platform":"apns","token":"t"}"#.to_owned(),
            r#"{"platform":"fcm","token":""}"#.to_owned(),
            r#"{"platform":"fcm"}"#.to_owned(),
            r#"{"platform":"fcm","token":5}"#.to_owned(),
            r#"[1]"#.to_owned(),
            format!(r#"{{"platform":"fcm","token":"{long}"}}"#),
        ] {
            assert_eq!(
                parse(&format!(r#"{{"push_wake":{bad}}}"#)),
                Ok(BinaryMessage::PushInvalid)
            );
        }
        assert_eq!(parse(r#"{"push_wake":null}"#), Err(EnvelopeError::NoConnId));
        // A conn_id makes it a delivery; push_wake is ignored (row 7).
        assert_eq!(
            parse(r#"{"conn_id":"c","frame":1,"push_wake":{"platform":"fcm","token":"t"}}"#),
            Ok(deliver("c", Some("1"), None))
        );
    }

    #[test]
    fn invalid_utf8_is_malformed_difference_9() {
        let data = Bytes::from_static(b"{\"conn_id\":\"c\",\"frame\":\"\xff\"}");
        assert_eq!(BinaryMessage::parse(&data), Err(EnvelopeError::NotAnObject));
    }
}
