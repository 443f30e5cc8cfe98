//! Every scenario against `switchyard-tokio`.

switchyard_tests::suite!(switchyard_tests::runtimes::Tokio);
