//! cargo-fuzz target `safetensors`: the body is [`juicer::fuzzing::safetensors`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::safetensors(data));
