#![no_main]
//! The hello payload decoder behind the frame checksum, so the fuzzer reaches every field; what
//! decodes must re-encode to the same value.
use kvcore::wire::{Kind, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode_body(Kind::Hello, data) {
        assert_eq!(Message::decode_body(Kind::Hello, &m.encode_body()), Ok(m));
    }
});
