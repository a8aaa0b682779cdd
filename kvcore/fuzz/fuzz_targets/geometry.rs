#![no_main]
//! The geometry codec used in slot headers and handshakes.
use kvcore::wire::{decode_geometry, encode_geometry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = decode_geometry(data) {
        assert_eq!(decode_geometry(&encode_geometry(&g)), Ok(g));
        let _ = g.block_bytes();
    }
});
