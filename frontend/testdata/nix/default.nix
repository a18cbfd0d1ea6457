# The end-to-end test corpus: every attribute is one case (a derivation, or an
# attrset of derivations where noted) that `nix-build` and `tvixfarm build`
# must build to the same outputs, bit for bit, or must both refuse.
#
#   nix-build frontend/testdata/nix -A trivial \
#     --argstr busybox "$(cat /etc/nix/tvixfarm-busybox-path)" [--argstr salt X]
#
# `busybox` is the store path printed by scripts/nix-setup.sh. A fresh `salt`
# changes every output path, so nothing comes from a cache. Salts go into
# store names: use letters, digits and dashes only.
#
# Cases marked FAILS are expected to fail (README.md has the table and the
# error Nix gives). `large` is slow (200 MiB); everything else builds in a
# few seconds.
{ busybox, salt ? "" }:
let
  lib = import ./lib.nix { inherit busybox salt; };
  inherit (lib) bb mkDrv saltName;

  # The chain: a <- b <- chain, plus inputs that chain only mentions in odd
  # places (a bare hash, a file name) and one it never mentions.
  chainA = mkDrv {
    name = "chain-a";
    script = ''
      mkdir $out
      echo "I am a" > $out/a.txt
    '';
  };
  chainB = mkDrv {
    name = "chain-b";
    a = chainA;
    script = ''
      mkdir $out
      echo "$a" > $out/a-path
    '';
  };
  chainHashOnly = mkDrv {
    name = "chain-hash-only";
    script = "echo hash-only > $out";
  };
  chainNameOnly = mkDrv {
    name = "chain-name-only";
    script = "echo name-only > $out";
  };
  chainUnused = mkDrv {
    name = "chain-unused";
    script = "echo unused > $out";
  };

  # Output shape shared by the reference-check cases: one file naming each
  # of `refs` (space separated store paths).
  refsTo = name: refs: extra: mkDrv ({
    inherit name refs;
    script = ''
      for r in $refs; do echo "$r"; done > $out
    '';
  } // extra);

  # The fixed-output derivations' contents (hashes computed with nix-hash).
  fodFlatScript = ''
    printf 'flat fixed-output\n' > $out
  '';
  fodRecScript = ''
    mkdir $out
    printf 'recursive fixed-output\n' > $out/file
    printf '#!/bin/sh\necho hi\n' > $out/exec
    chmod +x $out/exec
    ln -s file $out/link
    mkdir $out/empty
  '';
  fod = name: mode: algo: hash: mkDrv ({
    name = saltName name;
    outputHashMode = mode;
    outputHash = hash;
    script = if mode == "flat" then fodFlatScript else fodRecScript;
  } // (if algo == null then { } else { outputHashAlgo = algo; }));

  plainFile = builtins.toFile "plain.txt" "plain text from builtins.toFile\n";
  # toFile may refer to other sources (not to derivation outputs): this one
  # gets plainFile and busybox as references.
  contextFile = builtins.toFile "with-context.sh" ''
    #!${bb}/bin/sh
    cat ${plainFile}
  '';
in
{
  # trivial: one derivation, one output file, no references. Succeeds.
  trivial = mkDrv {
    name = "trivial";
    script = ''
      echo "hello from a trivial derivation" > $out
    '';
  };

  # multiOutput: outputs out, dev, doc, bin. out refers to dev, dev to doc,
  # bin to out and to busybox; doc refers to nothing. Succeeds.
  multiOutput = mkDrv {
    name = "multi-output";
    outputs = [ "out" "dev" "doc" "bin" ];
    script = ''
      mkdir $out $dev $doc $bin
      echo "doc text" > $doc/README
      echo "$doc/README" > $dev/doc-path
      echo "$dev" > $out/dev-path
      ln -s $out $bin/out-link
      ln -s ${bb}/bin/busybox $bin/sh
    '';
  };

  # multiOutputCycle: out refers to dev and dev to out, a cycle between
  # outputs. FAILS (cycle detected).
  multiOutputCycle = mkDrv {
    name = "multi-output-cycle";
    outputs = [ "out" "dev" ];
    script = ''
      echo "$dev" > $out
      echo "$out" > $dev
    '';
  };

  # chain: inputs chain-b, chain-hash-only, chain-name-only, chain-unused.
  # References are found only by scanning: chain-a (transitive, via the
  # contents copied from b), chain-b (symlink target), chain-hash-only (bare
  # 32-char hash in a file), chain-name-only (in a file name). chain-unused
  # must not become a reference, nor the made-up path outside the closure.
  # Succeeds.
  chain = mkDrv {
    name = "chain";
    b = chainB;
    hashOnly = chainHashOnly;
    nameOnly = chainNameOnly;
    unused = chainUnused;
    script = ''
      mkdir $out
      cat $b/a-path > $out/from-b
      ln -s $b $out/b-link
      basename $hashOnly | cut -c1-32 > $out/bare-hash
      touch $out/name-$(basename $nameOnly)
      echo /nix/store/00000000000000000000000000000000-not-in-closure > $out/outside
    '';
  };

  # wide: 200 leaves (each uses the salt) and one aggregator naming and
  # reading all of them, so it refers to all 200. Succeeds.
  wide = mkDrv {
    name = "wide";
    leaves = builtins.genList
      (i: mkDrv {
        name = "wide-leaf-${toString i}";
        script = "echo leaf ${toString i} > $out";
      }) 200;
    script = ''
      for l in $leaves; do echo "$l: $(cat $l)"; done > $out
    '';
  };

  # fixedOutput (attrset of 9): flat and recursive fixed-output derivations
  # with md5/sha1/sha256/sha512 hashes written as nix32, hex, base64 and SRI
  # (SRI with and without outputHashAlgo). Succeed.
  fixedOutput = {
    flatSha256Nix32 = fod "fod-flat-sha256-nix32" "flat" "sha256" "170rc96drk5gx0p0p3xb5xax1p0ivf735sq8psnzsa4mnqbqql1z";
    flatSha1Hex = fod "fod-flat-sha1-hex" "flat" "sha1" "fefe1e934f26cbf93622d8a0f57508951bfcf682";
    flatMd5Base64 = fod "fod-flat-md5-base64" "flat" "md5" "b64tPo3jIDL3ch1+ZswvUg==";
    flatSha512Sri = fod "fod-flat-sha512-sri" "flat" null "sha512-Coy+4EuixbIiuNVtzXYxexkzH3jEIMEGBXA838aQhOCzJ+YFd2RLhGAP86c7UYAyyG5QSkqDcqULJAzKEJJ1sQ==";
    recSha256Sri = fod "fod-rec-sha256-sri" "recursive" "sha256" "sha256-9z8N9uCr2Nb/Foq+VjHVxP7C0hjHPvFr0Q7n3lB1MMk=";
    recSha1Nix32 = fod "fod-rec-sha1-nix32" "recursive" "sha1" "986vqpckvjb91vvhx0555p85lmy47vn9";
    recSha512Base64 = fod "fod-rec-sha512-base64" "recursive" "sha512" "oayEbEm1K6nztMC62RN+lIxuKCIMwTV0NVnpDXSGY/mKly+w9BqmCNY1h+o8v6fBAajp5OjYnd78jMFmtGTwNA==";
    recMd5Hex = fod "fod-rec-md5-hex" "recursive" "md5" "57a1d8f7fccba6bdc5ccda464478d12e";
    recSha256Hex = fod "fod-rec-sha256-hex" "recursive" "sha256" "f73f0df6e0abd8d6ff168abe5631d5c4fec2d218c73ef16bd10ee7de507530c9";
  };

  # fodMismatch: a flat sha256 fixed-output derivation whose declared hash
  # (of the empty string) is not that of its output. FAILS (hash mismatch).
  fodMismatch = fod "fod-mismatch" "flat" "sha256" "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";

  # passAsFile: two attributes passed as files (/build/.attr-<nix32 sha256
  # of the name>), one ending without a newline; the output records the
  # file names, the contents and that the attributes are not in the env.
  # Succeeds.
  passAsFile = mkDrv {
    name = "pass-as-file";
    passAsFile = [ "text" "other" ];
    text = "line one\nline two\n";
    other = "no trailing newline";
    plain = "this one stays in the env";
    script = ''
      mkdir $out
      cp "$textPath" $out/text
      cp "$otherPath" $out/other
      {
        echo "textPath=$textPath"
        echo "otherPath=$otherPath"
        echo "text set: ''${text+yes}"
        echo "other set: ''${other+yes}"
        echo "plain=$plain"
        stat -c '%n %a' /build/.attr-*
      } > $out/info
    '';
  };

  # structuredAttrs: __structuredAttrs with ints, bools, floats (2.0 is
  # written as 2, and as an int in .attrs.sh), null, lists and nested sets. The builder has no $out nor attrs in its env; it
  # copies /build/.attrs.json and .attrs.sh and records its env (with
  # NIX_BUILD_CORES and Nix 2.8's wrong NIX_ATTRS_*_FILE host paths masked).
  # Succeeds.
  structuredAttrs = mkDrv {
    name = "structured-attrs";
    __structuredAttrs = true;
    anInt = 42;
    aNegativeInt = -7;
    aBool = true;
    aFalse = false;
    aFloat = 1.5;
    anotherFloat = 0.1;
    integralFloat = 2.0;
    aNull = null;
    aString = "with 'quotes' and \"double quotes\" and \$dollar";
    aList = [ 1 "two" 3.0 false [ "nested" ] ];
    stringList = [ "a" "b c" ];
    aSet = { x = 1; y.z = [ "deep" ]; "key with space" = "v"; };
    stringSet = { k1 = "v1"; k2 = "v2"; };
    "not-an-identifier" = "skipped in .attrs.sh";
    script = ''
      export PATH=${bb}/bin
      out=$(sed -n 's/.*"outputs":{"out":"\([^"]*\)"}.*/\1/p' /build/.attrs.json)
      mkdir $out
      cp /build/.attrs.json /build/.attrs.sh $out/
      tr '\0' '\n' < /proc/1/environ | sort \
        | sed -e 's/^NIX_BUILD_CORES=.*/NIX_BUILD_CORES=<masked>/' \
              -e 's/^\(NIX_ATTRS_[A-Z_]*_FILE\)=.*/\1=<masked>/' > $out/env
      ls -a /build > $out/build-dir
    '';
  };

  # placeholders: builtins.placeholder for out and dev in env attrs, in an
  # extra argument and inside the script itself; Nix replaces them with the
  # real output paths before the builder starts. Succeeds.
  placeholders = mkDrv {
    name = "placeholders";
    outputs = [ "out" "dev" ];
    outTarget = "${builtins.placeholder "out"}/share/target";
    devPath = builtins.placeholder "dev";
    scriptArgs = [ "placeholders-argv0" "${builtins.placeholder "dev"}/include" (builtins.placeholder "out") ];
    script = ''
      mkdir $out $dev
      {
        echo "env outTarget=$outTarget"
        echo "env devPath=$devPath"
        echo "arg0=$0"
        echo "arg1=$1"
        echo "arg2=$2"
        echo "in script=${builtins.placeholder "out"}"
      } > $out/seen
      echo dev > $dev/marker
    '';
  };

  # selfReference: the output contains its own path (in a file and as an
  # absolute symlink target), so it refers to itself. Succeeds.
  selfReference = mkDrv {
    name = "self-reference";
    script = ''
      mkdir $out
      echo "$out" > $out/self
      ln -s $out/self $out/self-link
    '';
  };

  # fileTypes: symlinks (relative, up-level, absolute, dangling, to a
  # directory, a loop), executable bits (0755, chmod 011 and 0100, which
  # Nix turns into 0444 and 0555), a hard link, empty files and directories
  # and a chmod 000 directory with a file inside. Succeeds.
  fileTypes = mkDrv {
    name = "file-types";
    script = ''
      mkdir -p $out/dir/sub $out/empty-dir $out/nested/empty
      echo data > $out/file
      : > $out/empty-file
      printf '#!/bin/sh\necho run\n' > $out/exec
      chmod 755 $out/exec
      echo mode011 > $out/mode011
      chmod 011 $out/mode011
      echo mode100 > $out/mode100
      chmod 100 $out/mode100
      echo mode600 > $out/mode600
      chmod 600 $out/mode600
      echo sub > $out/dir/sub/file
      ln -s file $out/rel-link
      ln -s ../../file $out/dir/sub/up-link
      ln -s /etc/passwd $out/abs-link
      ln -s does-not-exist $out/dangling
      ln -s dir $out/dir-link
      ln -s loop-b $out/loop-a
      ln -s loop-a $out/loop-b
      ln $out/file $out/hard-link
      mkdir $out/locked
      echo secret > $out/locked/inside
      chmod 000 $out/locked
    '';
  };

  # large: about 216 MB, a 200 MiB file of distinct 1 MiB blocks (no two
  # blocks equal) and 16 MiB of zeros. Slow (several seconds). Succeeds.
  large = mkDrv {
    name = "large";
    script = ''
      mkdir $out
      seq 1 170000 > /build/base
      i=0
      while [ $i -lt 200 ]; do
        printf 'block %08d\n' $i
        head -c 1048561 /build/base
        i=$((i + 1))
      done > $out/blocks
      dd if=/dev/zero bs=1048576 count=16 2>/dev/null > $out/zeros
    '';
  };

  # unicode: file names in NFC and NFD (distinct names), a newline in a
  # name, a 4-byte character, names that sort by raw bytes (B < Z < _ < a),
  # spaces, a backslash, and a symlink with a non-ASCII target. Succeeds.
  unicode = mkDrv {
    name = "unicode";
    script = ''
      mkdir $out
      cd $out
      echo nfc > "$(printf 'caf\303\251')"
      echo nfd > "$(printf 'cafe\314\201')"
      echo newline > "$(printf 'new\nline')"
      echo crab > "$(printf '\360\237\246\200')"
      mkdir "$(printf 'dir-\303\244')"
      echo inside > "$(printf 'dir-\303\244/\342\202\254')"
      for n in B Z _ a ' leading space' 'back\slash'; do echo "$n" > "$n"; done
      ln -s "$(printf 'caf\303\251')" "$(printf 'link-\303\251')"
    '';
  };

  # nonUtf8Name: a file name with the byte 0xff, valid in Nix and the NAR
  # but not UTF-8 (cannot be a proto3 string). Succeeds with Nix.
  nonUtf8Name = mkDrv {
    name = "non-utf8-name";
    script = ''
      mkdir $out
      echo latin1 > "$out/$(printf 'bad\377name')"
    '';
  };

  # Reference checks, after the build, on the scanned references. Each pair
  # is one passing and one FAILING case.
  # allowedReferencesOk: refers to chain-a only, which is allowed. Succeeds.
  allowedReferencesOk = refsTo "allowed-references-ok" [ chainA ] { allowedReferences = [ chainA ]; };
  # allowedReferencesFail: also refers to busybox, not allowed. FAILS.
  allowedReferencesFail = refsTo "allowed-references-fail" [ chainA bb ] { allowedReferences = [ chainA ]; };
  # allowedRequisitesOk: refers to chain-b, whose closure (chain-a) is
  # allowed too. Succeeds.
  allowedRequisitesOk = refsTo "allowed-requisites-ok" [ chainB ] { allowedRequisites = [ chainB chainA ]; };
  # allowedRequisitesFail: same, but chain-a (only in the closure) is not
  # allowed. FAILS.
  allowedRequisitesFail = refsTo "allowed-requisites-fail" [ chainB ] { allowedRequisites = [ chainB ]; };
  # disallowedReferencesOk: chain-a is disallowed but only in the closure,
  # not a direct reference. Succeeds.
  disallowedReferencesOk = refsTo "disallowed-references-ok" [ chainB ] { disallowedReferences = [ chainA ]; };
  # disallowedReferencesFail: refers directly to the disallowed chain-a. FAILS.
  disallowedReferencesFail = refsTo "disallowed-references-fail" [ chainA ] { disallowedReferences = [ chainA ]; };
  # disallowedRequisitesOk: busybox is disallowed and is not in the closure
  # (the builder uses it, the output does not refer to it). Succeeds.
  disallowedRequisitesOk = refsTo "disallowed-requisites-ok" [ chainB ] { disallowedRequisites = [ bb ]; };
  # disallowedRequisitesFail: chain-a, in the closure through chain-b, is
  # disallowed. FAILS.
  disallowedRequisitesFail = refsTo "disallowed-requisites-fail" [ chainB ] { disallowedRequisites = [ chainA ]; };

  # builderFails: logs a few lines (stdout and stderr, a tab, a CR) and
  # exits 3. FAILS (builder failed with exit code 3).
  builderFails = mkDrv {
    name = "builder-fails";
    script = ''
      echo "building something"
      printf 'a tab:\there, a CR:\r, done\n'
      echo "this line goes to stderr" >&2
      echo "about to fail with exit code 3"
      exit 3
    '';
  };

  # missingOutput: the builder exits 0 without creating $out. FAILS
  # (builder failed to produce output path).
  missingOutput = mkDrv {
    name = "missing-output";
    script = ''
      echo "not creating $out"
    '';
  };

  # network: a non-fixed-output builder must have no network but lo. The
  # builder checks /proc/net/dev, /proc/net/route and /proc/net/ipv6_route
  # and exits 1 at once if there is any other interface or route; only then
  # it tries 10.255.255.1:9, which fails immediately (ENETUNREACH) without
  # a route. It records what it saw. Succeeds (fails on a leaky sandbox).
  network = mkDrv {
    name = "network";
    script = ''
      ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ' ')
      v4routes=$(tail -n +2 /proc/net/route | wc -l)
      v6routes=0
      if [ -e /proc/net/ipv6_route ]; then
        v6routes=$(awk '$10 != "lo"' /proc/net/ipv6_route | wc -l)
      fi
      echo "interfaces: $ifaces"
      echo "ipv4 routes: $v4routes, ipv6 routes not on lo: $v6routes"
      if [ "$ifaces" != "lo " ] || [ "$v4routes" != 0 ] || [ "$v6routes" != 0 ]; then
        echo "the sandbox has a network besides lo; not trying to connect" >&2
        exit 1
      fi
      if err=$(nc -w 1 10.255.255.1 9 </dev/null 2>&1); then
        echo "connected to 10.255.255.1?!" >&2
        exit 1
      fi
      {
        echo "interfaces: $ifaces"
        echo "ipv4 routes: $v4routes"
        echo "ipv6 routes not on lo: $v6routes"
        echo "connect: $err"
      } > $out
    '';
  };

  # exportReferencesGraph: the closures of chain-b and busybox written to
  # /build/graph-b and /build/graph-bb, copied into the output (so it refers
  # to chain-a, chain-b and busybox). Succeeds.
  exportReferencesGraph = mkDrv {
    name = "export-references-graph";
    exportReferencesGraph = [ "graph-b" chainB "graph-bb" bb ];
    script = ''
      mkdir $out
      cp /build/graph-b /build/graph-bb $out/
      ls -a /build > $out/build-dir
    '';
  };

  # toFile: builtins.toFile sources, one plain and one with context (it
  # names plainFile and busybox, so it refers to both). The output copies
  # and links them. Succeeds.
  toFile = mkDrv {
    name = "to-file";
    plain = plainFile;
    withContext = contextFile;
    script = ''
      mkdir $out
      cp $plain $out/plain.txt
      cp $withContext $out/with-context.sh
      ln -s $withContext $out/with-context-link
      sh $withContext > $out/ran
    '';
  };

  # requiredSystemFeatures: asks for a feature no machine has. FAILS
  # (a machine with features {tvixfarm-no-such-feature} is required).
  requiredSystemFeatures = mkDrv {
    name = "required-system-features";
    requiredSystemFeatures = [ "tvixfarm-no-such-feature" ];
    script = "echo never > $out";
  };

  # envProbe (attrset of 4): what a builder sees, written into the outputs,
  # so that a farm giving a different environment gets different hashes.
  # Succeed.
  envProbe = {
    # identity: argv[0], pid, uid/gid/groups, umask, hostname, domainname,
    # cwd, no-new-privs, capabilities, setgroups.
    identity = mkDrv {
      name = "env-probe-identity";
      script = ''
        {
          echo "argv0=$(tr '\0' '\n' < /proc/1/cmdline | head -n 1)"
          echo "pid=$$"
          echo "id=$(id)"
          echo "umask=$(umask)"
          echo "hostname=$(hostname)"
          echo "uname-n=$(uname -n)"
          echo "domainname=$(cat /proc/sys/kernel/domainname)"
          echo "pwd=$(pwd)"
          echo "cwd=$(readlink /proc/self/cwd)"
          echo "setgroups=$(cat /proc/self/setgroups)"
          grep -E '^(NoNewPrivs|CapInh|CapPrm|CapEff|CapAmb):' /proc/self/status
        } > $out
      '';
    };
    # environment: the builder's envp, sorted, NIX_BUILD_CORES masked; then
    # the variable names in envp order.
    environment = mkDrv {
      name = "env-probe-environment";
      script = ''
        {
          tr '\0' '\n' < /proc/1/environ | sort | sed 's/^NIX_BUILD_CORES=.*/NIX_BUILD_CORES=<masked>/'
          echo "-- envp order"
          tr '\0' '\n' < /proc/1/environ | cut -d= -f1
        } > $out
      '';
    };
    # tty: stdin is /dev/null; stdout and stderr are one terminal
    # (/dev/pts/N). The report goes to fd 3 so that fds 1
    # and 2 stay the builder's own.
    tty = mkDrv {
      name = "env-probe-tty";
      script = ''
        exec 3> $out
        for fd in 0 1 2; do
          if [ -t $fd ]; then echo "fd $fd: tty" >&3; else echo "fd $fd: not a tty" >&3; fi
        done
        # Nix's builder gets a pty of the host's devpts, whose number depends
        # on the host's other terminals: it is masked.
        for fd in 0 1 2; do echo "fd $fd -> $(readlink /proc/1/fd/$fd | sed 's|^/dev/pts/[0-9][0-9]*$|/dev/pts/<N>|')" >&3; done
      '';
    };
    # filesystem: ls of /, /bin, /tmp, /etc (with contents), /dev (without
    # kvm, which depends on the host), /nix/store and /build; modes and
    # owners of the main directories; what is absent; what is writable.
    filesystem = mkDrv {
      name = "env-probe-filesystem";
      script = ''
        {
          echo "== ls /"; ls -a /
          echo "== stat"
          stat -c '%n %a %U:%G %F' / /bin /bin/sh /build /tmp /etc /etc/* /nix /nix/store /dev /dev/pts /dev/shm /proc
          echo "== ls /bin"; ls -a /bin
          echo "== ls /tmp"; ls -a /tmp
          echo "== ls /etc"; ls -a /etc
          for f in /etc/*; do echo "-- $f"; cat $f; done
          echo "== ls /dev"; ls -a /dev | grep -vx kvm
          echo "== ls /nix/store"; ls -a /nix/store
          echo "== ls /build"; ls -a /build
          echo "== absent"
          for p in /sys /run /var /usr /homeless-shelter /etc/resolv.conf /etc/nsswitch.conf; do
            if [ -e $p ]; then echo "$p exists"; else echo "$p absent"; fi
          done
          echo "== writable"
          for p in / /tmp /build /nix/store /etc; do
            if [ -w $p ]; then echo "$p writable"; else echo "$p not writable"; fi
          done
        } > /build/report
        cp /build/report $out
      '';
    };
  };

  # graph1000: a layered graph of 1,000 derivations (10 layers of 100; each
  # derivation of a layer depends on two of the layer below) and a root
  # that depends on the top layer; for the fully cached rebuild benchmark
  # (docs/BENCHMARKS.md). Succeeds. Not in nixtest.Cases (slow for Nix).
  graph1000 =
    let
      layer = n: below: builtins.genList
        (i: mkDrv ({
          name = "g-${toString n}-${toString i}";
          script = "echo ${toString n}-${toString i} $deps > $out";
          deps = if below == [ ] then [ ] else [
            (builtins.elemAt below i)
            (builtins.elemAt below (if i == 99 then 0 else i + 1))
          ];
        })) 100;
      layers = builtins.foldl' (acc: n: acc ++ [ (layer n (if acc == [ ] then [ ] else builtins.elemAt acc (n - 1))) ]) [ ] (builtins.genList (x: x) 10);
    in
    mkDrv {
      name = "graph1000";
      top = builtins.elemAt layers 9;
      script = "echo $top > $out";
    };
}
