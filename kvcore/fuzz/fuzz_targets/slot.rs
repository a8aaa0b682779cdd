#![no_main]
//! The on-disk slot header decoder: what decodes must re-encode to the same bytes' meaning; and
//! the note after it, read back from disk: whole and its own block's, or none, never a panic.
use kvcore::slot::{read_note, write_note, SlotHeader, NOTE_OFFSET};
use kvcore::BlockHash;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let some_block = BlockHash::from_u64(7);
    let mut blocks = vec![some_block];
    if let Ok(h) = SlotHeader::decode(data) {
        assert_eq!(SlotHeader::decode(&h.encode()), Ok(h));
        blocks.push(h.hash);
    }
    let area = data.get(NOTE_OFFSET..).unwrap_or(data);
    for hash in blocks {
        if let Some(note) = read_note(area, &hash) {
            let mut again = vec![0u8; area.len()];
            assert!(write_note(&mut again, &hash, note));
            assert_eq!(read_note(&again, &hash), Some(note));
        }
    }
});
