#![no_main]
//! NIXL side-channel frames: the length prefix, then the command body.
use kvcore::nixl::{NixlComm, COMM_LEN_BYTES, MAX_COMM_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < COMM_LEN_BYTES {
        return;
    }
    let (prefix, body) = data.split_at(COMM_LEN_BYTES);
    let Ok(prefix) = <[u8; COMM_LEN_BYTES]>::try_from(prefix) else {
        return;
    };
    if NixlComm::frame_len(prefix, MAX_COMM_FRAME) == Ok(body.len()) {
        if let Ok(c) = NixlComm::decode(body) {
            assert_eq!(c.encode(), data);
        }
    }
});
