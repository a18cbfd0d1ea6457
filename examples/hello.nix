# A sample derivation for `tvixfarm build examples/hello.nix` (the README's
# main command). There is no nixpkgs here: the builder is busybox, added to
# the local Nix store by scripts/nix-setup.sh, which records its store path
# in /etc/nix/tvixfarm-busybox-path.
{ busybox ? builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile /etc/nix/tvixfarm-busybox-path)
, greeting ? "Hello from tvixfarm"
}:
let
  bb = builtins.storePath busybox;
  greet = derivation {
    name = "greeting";
    system = "x86_64-linux";
    builder = "${bb}/bin/sh";
    PATH = "${bb}/bin";
    inherit greeting;
    args = [ "-e" "-c" ''
      echo "building the greeting as $(id -un) on $(hostname)"
      mkdir -p $out/share
      printf '%s\n' "$greeting" > $out/share/greeting
    '' ];
  };
in
derivation {
  name = "hello";
  system = "x86_64-linux";
  builder = "${bb}/bin/sh";
  PATH = "${bb}/bin";
  args = [ "-e" "-c" ''
    mkdir -p $out/bin
    cat > $out/bin/hello <<EOS
    #!${bb}/bin/sh
    exec ${bb}/bin/cat ${greet}/share/greeting
    EOS
    chmod +x $out/bin/hello
    echo "hello built; it refers to ${greet}"
  '' ];
}
