#![no_main]
//! The on-disk slot header decoder: what decodes must re-encode to the same bytes' meaning.
use kvcore::slot::SlotHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = SlotHeader::decode(data) {
        assert_eq!(SlotHeader::decode(&h.encode()), Ok(h));
    }
});
