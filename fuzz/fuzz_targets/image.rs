//! cargo-fuzz target `image`: the body is [`juicer::fuzzing::image`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::image(data));
