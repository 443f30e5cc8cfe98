//! Every scenario against `switchyard-smol`.

switchyard_tests::suite!(switchyard_tests::runtimes::Smol);
