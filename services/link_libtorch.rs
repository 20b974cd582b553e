//! Build script shared by every crate that produces binaries linked to libtorch.
//!
//! It embeds libtorch's directory as the binaries' RUNPATH, so they run without LD_LIBRARY_PATH,
//! and hands that directory to the code as `SYNOPSIS_LIBTORCH_LIB`. `libtorch_cuda.so` is not
//! linked: the model crate loads it at run time on GPU hosts only (`cuda_backend`), because
//! loading it costs every process about 230 MB of resident memory.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: binaries get no libtorch RUNPATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-env=SYNOPSIS_LIBTORCH_LIB={lib_dir}");
}
