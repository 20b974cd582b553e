//! Build script shared by every crate that produces binaries linked to libtorch.
//!
//! It embeds libtorch's directory as the binaries' RUNPATH, so they run without LD_LIBRARY_PATH,
//! and keeps `libtorch_cuda.so` as a needed library even though no symbol of it is referenced:
//! without `--no-as-needed` the linker drops it and a binary silently runs CPU-only on a GPU node.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: binaries get no libtorch RUNPATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    let cuda = std::path::Path::new(&lib_dir).join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
