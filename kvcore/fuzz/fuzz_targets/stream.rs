#![no_main]
//! The stream decoder, fed the input in chunks whose sizes come from the input's first byte.
use kvcore::wire::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut d = FrameDecoder::new(1 << 16);
    for piece in rest.chunks(chunk) {
        d.push(piece);
        loop {
            match d.next_message() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
