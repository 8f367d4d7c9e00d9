"""What tests (and the benchmarks, which run the same real processes) share: servers, load,
fault scenarios. Test modules import from here, never from each other or from bench."""
