# Helpers for the test corpus: builders made of busybox only (there is no
# nixpkgs). `busybox` is the store path string that scripts/nix-setup.sh
# printed; builtins.storePath gives it string context, so it becomes an
# inputSrc of every derivation (a path literal would be re-copied into the
# store under another name). `salt`, when not empty, becomes an env attr of
# every derivation and a suffix of every fixed-output name, so a fresh salt
# gives fresh output paths everywhere.
{ busybox, salt ? "" }:
rec {
  system = "x86_64-linux";
  bb = builtins.storePath busybox;
  sh = "${bb}/bin/sh";

  # saltName appends the salt to a name (fixed-output paths depend only on
  # name and hash, so the salt has to go there to change them).
  saltName = name: if salt == "" then name else "${name}-${salt}";

  # mkDrv runs `sh -e -c script [scriptArgs...]` with PATH = busybox. Every
  # other attribute is passed to `derivation` unchanged.
  mkDrv = { name, script, scriptArgs ? [ ], ... }@args:
    derivation ((removeAttrs args [ "script" "scriptArgs" ]) // {
      inherit name system;
      builder = sh;
      args = [ "-e" "-c" script ] ++ scriptArgs;
      PATH = "${bb}/bin";
    } // (if salt == "" then { } else { inherit salt; }));
}
