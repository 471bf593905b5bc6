//! One input stream and a list of split points: decoding in pieces gives
//! exactly the items of decoding it whole.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/agentwire/tests/common/pieces.rs"]
mod pieces;

#[derive(Arbitrary, Debug)]
struct Input {
    cuts: Vec<u16>,
    limit: u16,
    stream: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let limit = usize::from(input.limit).max(agentwire::FRAME_HEADER_SIZE);
    let mut cuts: Vec<usize> = input.cuts.iter().map(|c| usize::from(*c) % (input.stream.len() + 1)).collect();
    cuts.sort_unstable();
    let whole = pieces::decode_in_pieces(&input.stream, &[], limit);
    assert_eq!(pieces::decode_in_pieces(&input.stream, &cuts, limit), whole);
});
