package executor

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/executor/sandbox"
)

// The probe suite: actions that look at their sandbox from inside and
// report what they see. Each probe runs as a Nix action (chroot into the
// input root) and, where it applies, as a plain REAPI action (input root
// at /work over a read-only host root).

// kinds returns both kinds of action running script, with mod applied.
func (e *testEnv) kinds(script string, mod func(*action)) map[string]action {
	nix := e.nixAction(script, mod)
	host := action{
		args:     []string{"/bin/sh", "-c", script},
		env:      map[string]string{"PATH": "/usr/bin:/bin"},
		wd:       "wd",
		platform: map[string]string{},
		root:     map[string]entry{"wd/input.txt": file("input\n")},
	}
	if mod != nil {
		mod(&host)
	}
	return map[string]action{"nix": nix, "reapi": host}
}

// netCheck prints the interfaces and routes the sandbox sees and, only if
// there is no route at all (so no packet can leave the machine), tries to
// connect to a non-loopback address.
const netCheck = `
ifs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ' ')
echo "ifs: $ifs"
routes=$(tail -n +2 /proc/net/route | wc -l)
echo "routes: $routes"
if [ "$routes" = 0 ] && [ "$ifs" = "lo " ]; then
  NC=nc; command -v nc >/dev/null || NC="busybox nc"
  if $NC -w 1 10.255.255.1 80 </dev/null 2>/tmp/nc.err; then echo "connect: ok"; else echo "connect: failed $(cat /tmp/nc.err)"; fi
fi
`

func TestProbeNetworkIsolated(t *testing.T) {
	e := newEnv(t, 0)
	for kind, a := range e.kinds(netCheck, nil) {
		t.Run(kind, func(t *testing.T) {
			code, out, errs := e.sh(a)
			if code != 0 {
				t.Fatalf("exit %d: %s %s", code, out, errs)
			}
			if !hasLine(out, "ifs: lo") || !hasLine(out, "routes: 0") {
				t.Fatalf("sandbox sees more than lo without routes:\n%s", out)
			}
			if !strings.Contains(out, "connect: failed") || !strings.Contains(out, "unreachable") {
				t.Fatalf("connect to a non-loopback address did not fail as unreachable:\n%s", out)
			}
		})
	}
}

func TestProbeNetworkHost(t *testing.T) {
	e := newEnv(t, 0)
	script := `tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort; echo routes: $(tail -n +2 /proc/net/route | wc -l); ls /etc; cat /etc/nsswitch.conf`
	set := func(a *action) {
		a.platform[PropNetwork] = "true"
	}
	nix := e.nixAction(script, set)
	host := action{args: []string{"/bin/sh", "-c", script}, env: map[string]string{"PATH": "/usr/bin:/bin"},
		root: map[string]entry{"x": file("")}, platform: map[string]string{PropNetwork: "true"}}
	for kind, a := range map[string]action{"nix": nix, "reapi": host} {
		t.Run(kind, func(t *testing.T) {
			code, out, errs := e.sh(a)
			if code != 0 {
				t.Fatalf("exit %d: %s %s", code, out, errs)
			}
			ifs := 0
			for _, l := range lines(out) {
				if l == "lo" || strings.HasPrefix(l, "eth") || strings.HasPrefix(l, "en") {
					ifs++
				}
			}
			if ifs < 2 && hasLine(out, "routes: 0") {
				t.Fatalf("network=true does not give the host network:\n%s", out)
			}
			for _, f := range []string{"resolv.conf", "hosts", "services", "nsswitch.conf"} {
				if !hasLine(out, f) {
					t.Errorf("/etc lacks %s:\n%s", f, out)
				}
			}
			if !strings.Contains(out, "hosts: files dns") {
				t.Errorf("nsswitch.conf is not Nix's:\n%s", out)
			}
		})
	}
}

func TestProbeIdentity(t *testing.T) {
	e := newEnv(t, 0)
	script := `echo host=$(hostname); id; echo pwd=$(pwd); grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp|Groups):' /proc/self/status; echo pid=$$; umask
echo setgroups=$(cat /proc/self/setgroups); awk '{print "uid_map=" $1, $2, $3}' /proc/self/uid_map; awk '{print "gid_map=" $1, $2, $3}' /proc/self/gid_map`
	for kind, a := range e.kinds(script, nil) {
		t.Run(kind, func(t *testing.T) {
			code, out, errs := e.sh(a)
			if code != 0 {
				t.Fatalf("exit %d: %s %s", code, out, errs)
			}
			for _, want := range []string{"host=localhost", "CapInh:\t0000000000000000", "CapPrm:\t0000000000000000",
				"CapEff:\t0000000000000000", "CapBnd:\t0000000000000000", "CapAmb:\t0000000000000000", "NoNewPrivs:\t1", "Seccomp:\t2", "pid=1", "0022"} {
				if !strings.Contains(out, want) {
					t.Errorf("missing %q in:\n%s", want, out)
				}
			}
			if !strings.Contains(out, "uid=1000") || !strings.Contains(out, "gid=100") {
				t.Errorf("not uid 1000 gid 100:\n%s", out)
			}
			wantPwd := "pwd=/build"
			if kind == "reapi" {
				wantPwd = "pwd=/work/wd"
			}
			if !hasLine(out, wantPwd) {
				t.Errorf("want %s:\n%s", wantPwd, out)
			}
			if kind == "reapi" {
				if testReuse() > 1 {
					// A reused sandbox runs each command in a user
					// namespace that maps only host uid 1000 and gid
					// 100, to themselves.
					if !hasLine(out, "setgroups=deny") || !hasLine(out, "uid_map=1000 1000 1") || !hasLine(out, "gid_map=100 100 1") || !hasLine(out, "Groups:") {
						t.Errorf("a plain REAPI action in a reused sandbox is not host uid 1000 and gid 100 alone:\n%s", out)
					}
					return
				}
				// No user namespace: host uid 1000 and gid 100.
				if !hasLine(out, "setgroups=allow") || !hasLine(out, "uid_map=0 0 4294967295") {
					t.Errorf("a plain REAPI action has a user namespace:\n%s", out)
				}
				return
			}
			// As in Nix: uid 1000 (nixbld) and gid 100 (nixbld), no
			// supplementary groups, a user namespace mapping only them
			// to a host build user, setgroups denied.
			if !hasLine(out, "uid=1000(nixbld) gid=100(nixbld)") {
				t.Errorf("id is not Nix's uid=1000(nixbld) gid=100(nixbld):\n%s", out)
			}
			if !hasLine(out, "Groups:") || !hasLine(out, "setgroups=deny") {
				t.Errorf("want no supplementary groups and setgroups denied:\n%s", out)
			}
			var uid, gid, n int
			for _, l := range lines(out) {
				fmt.Sscanf(l, "uid_map=1000 %d 1", &uid)
				fmt.Sscanf(l, "gid_map=100 %d 1", &gid)
				if strings.HasPrefix(l, "uid_map=") || strings.HasPrefix(l, "gid_map=") {
					n++
				}
			}
			u := sandbox.DefaultBuildUsers
			if n != 2 || uid < u.FirstUID || uid >= u.FirstUID+u.Count || gid != u.GID {
				t.Errorf("user namespace does not map exactly 1000 to a build uid and 100 to the build group:\n%s", out)
			}
		})
	}
}

// TestProbeFilesystemNix checks the file system a Nix builder sees
// against what Nix 2.8's sandbox shows (nix-sandbox.md §3, measured with
// the corpus's envProbe.filesystem): the modes, and the owners as seen
// through the user namespace, in which only the build user and group
// exist; everything of root's is nobody:nogroup.
func TestProbeFilesystemNix(t *testing.T) {
	e := newEnv(t, 0)
	script := `
ls / | tr '\n' ' '; echo
ls /etc | tr '\n' ' '; echo
cat /etc/passwd /etc/group /etc/hosts
ls /dev | tr '\n' ' '; echo
stat -c '%n %a %U:%G %F' / /bin /bin/sh /build /build/.attr-x /build/sub /build/sub/f /tmp /etc /etc/* /nix /nix/store /nix/store/*-busybox/bin/busybox /dev /dev/pts /dev/shm /proc
ls /nix/store
echo argv0=$0
`
	nixStat := []string{
		"/ 750 nobody:nixbld directory",
		"/bin 755 nobody:nogroup directory",
		"/bin/sh 555 nobody:nogroup regular file",
		"/build 700 nixbld:nixbld directory",
		"/build/.attr-x 644 nixbld:nixbld regular file", // passAsFile, written by Nix as the build user
		"/build/sub 755 nixbld:nixbld directory",
		"/build/sub/f 644 nixbld:nixbld regular file",
		"/tmp 1777 nobody:nogroup directory",
		"/etc 755 nobody:nogroup directory",
		"/etc/group 644 nobody:nogroup regular file",
		"/etc/hosts 644 nobody:nogroup regular file",
		"/etc/passwd 644 nobody:nogroup regular file",
		"/nix 755 nobody:nogroup directory",
		"/nix/store 1775 nobody:nixbld directory",
		"/" + busyboxPath + "/bin/busybox 555 nobody:nogroup regular file",
		"/dev 755 nobody:nogroup directory",
		"/dev/pts 755 nobody:nogroup directory",
		"/dev/shm 1777 nobody:nogroup directory",
		"/proc 555 nobody:nogroup directory",
	}
	for _, etc := range []string{"executor", "input root", "input root, other contents"} {
		t.Run(etc, func(t *testing.T) {
			a := e.nixAction(script, func(a *action) {
				a.outputs = []string{"../nix/store/abc-out"}
				a.root["bin/sh"] = execFile(busyboxBytes) // as Nix's sandbox-paths give it
				a.root["build/.attr-x"] = file("passed as a file\n")
				a.root["build/sub/f"] = file("f\n")
				switch etc {
				case "input root":
					// As frontend/translate gives them.
					a.root["etc/passwd"] = file(sandbox.NixPasswd)
					a.root["etc/group"] = file(sandbox.NixGroup)
					a.root["etc/hosts"] = file(sandbox.NixHosts)
				case "input root, other contents":
					a.root["etc/passwd"] = file(sandbox.NixPasswd)
					a.root["etc/group"] = file(sandbox.NixGroup)
					a.root["etc/hosts"] = file(sandbox.NixHosts + "10.1.1.1 other\n")
				}
			})
			code, out, errs := e.sh(a)
			if code != 0 {
				t.Fatalf("exit %d: %s %s", code, out, errs)
			}
			t.Logf("\n%s", out)
			want := append([]string{
				"bin build dev etc nix proc tmp",
				"group hosts passwd",
				"nixbld:x:1000:100:Nix build user:/build:/noshell",
				"nixbld:!:100:",
				"127.0.0.1 localhost",
				"s1y78axx3ky46cgzv60pyry4irrlv0pl-busybox",
				"argv0=sh",
			}, nixStat...)
			if etc == "input root, other contents" {
				want = append(want, "10.1.1.1 other")
			}
			for _, w := range want {
				if !hasLine(out, w) {
					t.Errorf("missing line %q", w)
				}
			}
			var devs []string
			for _, l := range lines(out) {
				if strings.HasPrefix(l, "fd ") {
					devs = strings.Fields(l)
				}
			}
			for _, dev := range []string{"full", "null", "random", "tty", "urandom", "zero", "ptmx", "pts", "shm"} {
				if !slices.Contains(devs, dev) {
					t.Errorf("/dev lacks %s: %v", dev, devs)
				}
			}
		})
	}
}

// TestProbeBuildFilesPrivate checks that the files of /build, which
// belong to the build user in Nix actions, are the action's own copies:
// changing them changes neither the input cache nor the next action.
func TestProbeBuildFilesPrivate(t *testing.T) {
	e := newEnv(t, 1)
	script := `cat /build/.attr-x; stat -c '%a %U:%G %h' /build/.attr-x; echo changed >> /build/.attr-x && chmod 600 /build/.attr-x && echo wrote
cat /etc/hosts >/dev/null; echo x >> /etc/hosts 2>/dev/null && echo wrote-etc; chmod 666 /etc/hosts 2>/dev/null && echo chmod-etc
touch /nix/store/abc-out`
	a := e.nixAction(script, func(a *action) {
		a.root["build/.attr-x"] = file("original\n")
		a.root["build/.attr-y"] = file("original\n") // the same contents: the same cache entry
		a.root["etc/hosts"] = file(sandbox.NixHosts)
		a.outputs = []string{"../nix/store/abc-out"}
	})
	for run := range 3 {
		code, out, errs := e.sh(a)
		if code != 0 {
			t.Fatalf("run %d: exit %d: %s %s", run, code, out, errs)
		}
		if want := "original\n644 nixbld:nixbld 1\nwrote\n"; out != want {
			t.Errorf("run %d: stdout %q, want %q (stderr %q)", run, out, want, errs)
		}
	}
}

// writable reports, for each path, whether the build can create a file in
// it (directories) or write to it (files).
const writableCheck = `
for p in "$@"; do
  if [ -d "$p" ]; then
    if touch "$p/.probe" 2>/dev/null; then echo "$p writable"; rm -f "$p/.probe"; else echo "$p readonly"; fi
  else
    if (echo x >> "$p") 2>/dev/null; then echo "$p writable"; else echo "$p readonly"; fi
  fi
done
`

func TestProbeWritable(t *testing.T) {
	e := newEnv(t, 0)
	t.Run("nix", func(t *testing.T) {
		a := e.nixAction(writableCheck, func(a *action) {
			a.args = append(a.args, "probe", "/", "/build", "/tmp", "/dev/shm", "/nix/store", "/"+busyboxPath,
				"/"+busyboxPath+"/bin/busybox", "/etc", "/etc/passwd", "/bin", "/proc/sys/kernel/hostname", "/nix/store/input.txt")
			a.root["nix/store/input.txt"] = file("input")
			a.outputs = []string{"../nix/store/abc-out"}
		})
		code, out, errs := e.sh(a)
		if code != 0 {
			t.Fatalf("exit %d: %s %s", code, out, errs)
		}
		for _, w := range []string{"/build", "/tmp", "/dev/shm", "/nix/store"} {
			if !hasLine(out, w+" writable") {
				t.Errorf("%s should be writable:\n%s", w, out)
			}
		}
		for _, r := range []string{"/", "/" + busyboxPath, "/" + busyboxPath + "/bin/busybox", "/etc", "/etc/passwd", "/bin", "/proc/sys/kernel/hostname", "/nix/store/input.txt"} {
			if !hasLine(out, r+" readonly") {
				t.Errorf("%s should be read-only:\n%s", r, out)
			}
		}
	})
	t.Run("reapi", func(t *testing.T) {
		a := action{args: []string{"/bin/sh", "-c", writableCheck, "probe", "/", "/usr", "/usr/bin", "/etc", "/etc/passwd",
			"/work", "/work/wd", "/work/wd/sub", "/work/wd/input.txt", "/work/other", "/tmp", "/proc/sys/kernel/hostname"},
			env: map[string]string{"PATH": "/usr/bin:/bin"}, wd: "wd",
			root: map[string]entry{"wd/input.txt": file("input\n"), "wd/sub/x": file(""), "other/y": file("")}}
		code, out, errs := e.sh(a)
		if code != 0 {
			t.Fatalf("exit %d: %s %s", code, out, errs)
		}
		for _, w := range []string{"/work/wd", "/work/wd/sub", "/tmp"} {
			if !hasLine(out, w+" writable") {
				t.Errorf("%s should be writable:\n%s", w, out)
			}
		}
		for _, r := range []string{"/", "/usr", "/usr/bin", "/etc", "/etc/passwd", "/work", "/work/wd/input.txt", "/work/other", "/proc/sys/kernel/hostname"} {
			if !hasLine(out, r+" readonly") {
				t.Errorf("%s should be read-only:\n%s", r, out)
			}
		}
	})
}

func TestProbeHostRootHidesHost(t *testing.T) {
	e := newEnv(t, 0)
	a := action{args: []string{"/bin/sh", "-c", `ls / | tr '\n' ' '; echo; ls /root /home /var 2>&1 | head -3; cat /etc/passwd`},
		env: map[string]string{"PATH": "/usr/bin:/bin"}, root: map[string]entry{"x": file("")}}
	code, out, _ := e.sh(a)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, out)
	}
	t.Logf("\n%s", out)
	if strings.Contains(out, " root ") || strings.Contains(out, " home ") || strings.Contains(out, " var ") {
		t.Errorf("host directories visible:\n%s", out)
	}
	if !strings.Contains(out, "nixbld:x:1000:100") {
		t.Errorf("/etc/passwd is not the sandbox's:\n%s", out)
	}
}

func TestProbePrivileges(t *testing.T) {
	e := newEnv(t, 0)
	script := `
cd /tmp
if mknod dev c 1 3 2>/dev/null; then echo "mknod: allowed"; else echo "mknod: denied"; fi
touch f
if chmod u+s f 2>/dev/null; then echo "setuid: allowed"; else echo "setuid: denied"; fi
if chmod g+s f 2>/dev/null; then echo "setgid: allowed"; else echo "setgid: denied"; fi
if chmod 755 f 2>/dev/null; then echo "chmod: allowed"; else echo "chmod: denied"; fi
if setfattr -n user.x -v 1 f 2>/dev/null; then echo "xattr: allowed"; else echo "xattr: denied"; fi
if mount -t tmpfs none /tmp 2>/dev/null; then echo "mount: allowed"; else echo "mount: denied"; fi
if echo 1 > /proc/sys/kernel/hostname 2>/dev/null; then echo "procsys: allowed"; else echo "procsys: denied"; fi
if hostname evil 2>/dev/null; then echo "sethostname: allowed"; else echo "sethostname: denied"; fi
`
	for kind, a := range e.kinds(script, nil) {
		t.Run(kind, func(t *testing.T) {
			code, out, errs := e.sh(a)
			if code != 0 {
				t.Fatalf("exit %d: %s %s", code, out, errs)
			}
			for _, want := range []string{"mknod: denied", "setuid: denied", "setgid: denied", "chmod: allowed", "mount: denied", "procsys: denied", "sethostname: denied"} {
				if !hasLine(out, want) {
					t.Errorf("want %q:\n%s", want, out)
				}
			}
		})
	}
}

func TestProbeInputsReadOnly(t *testing.T) {
	e := newEnv(t, 0)
	script := `
f=/nix/store/abc-input/file
if echo x >> $f 2>/dev/null; then echo "write: allowed"; else echo "write: denied"; fi
if chmod 777 $f 2>/dev/null; then echo "chmod: allowed"; else echo "chmod: denied"; fi
if rm -f $f 2>/dev/null && [ ! -e $f ]; then echo "rm: allowed"; else echo "rm: denied"; fi
if rm -rf /nix/store/abc-input 2>/dev/null && [ ! -e /nix/store/abc-input ]; then echo "rmdir: allowed"; else echo "rmdir: denied"; fi
if mv /nix/store/abc-input /nix/store/moved 2>/dev/null; then echo "rename: allowed"; else echo "rename: denied"; fi
if ln /nix/store/abc-input/file /build/link 2>/dev/null; then echo "hardlink: allowed"; else echo "hardlink: denied"; fi
cat $f
`
	a := e.nixAction(script, func(a *action) {
		a.root["nix/store/abc-input/file"] = file("original\n")
		a.outputs = []string{"../nix/store/xyz-out"}
	})
	code, out, errs := e.sh(a)
	if code != 0 {
		t.Fatalf("exit %d: %s %s", code, out, errs)
	}
	for _, want := range []string{"write: denied", "chmod: denied", "rm: denied", "rmdir: denied", "rename: denied", "hardlink: denied", "original"} {
		if !hasLine(out, want) {
			t.Errorf("want %q:\n%s", want, out)
		}
	}
}

func TestProbeTimeout(t *testing.T) {
	e := newEnv(t, 0)
	// pid 1 ignores SIGTERM, and so does its child: only SIGKILL from
	// outside stops them.
	script := `trap '' TERM; (trap '' TERM; sleep 100) & echo started; sleep 100`
	for kind, a := range e.kinds(script, func(a *action) { a.timeout = 500 * time.Millisecond }) {
		t.Run(kind, func(t *testing.T) {
			t0 := time.Now()
			resp := e.run(a)
			if d := time.Since(t0); d > 20*time.Second {
				t.Fatalf("took %s", d)
			}
			if codes.Code(resp.Status.Code) != codes.DeadlineExceeded {
				t.Fatalf("status %v, want DEADLINE_EXCEEDED", resp.Status)
			}
			if resp.Result.ExitCode != 137 {
				t.Errorf("exit %d, want 137", resp.Result.ExitCode)
			}
			if out := e.blob(resp.Result.StdoutDigest); !strings.Contains(out, "started") {
				t.Errorf("stdout %q", out)
			}
		})
	}
}

func TestProbeOOM(t *testing.T) {
	e := newEnv(t, 0)
	script := `s=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; while true; do s="$s$s"; done`
	for kind, a := range e.kinds(script, func(a *action) {
		a.platform[PropMemoryLimit] = "64M"
	}) {
		t.Run(kind, func(t *testing.T) {
			resp := e.run(a)
			if resp.Result.ExitCode != 137 {
				t.Errorf("exit %d, want 137", resp.Result.ExitCode)
			}
			if !strings.Contains(resp.Message, "out of memory") {
				t.Errorf("message %q does not report the OOM kill", resp.Message)
			}
			if errs := e.blob(resp.Result.StderrDigest); !strings.Contains(errs, "out of memory") {
				t.Errorf("stderr %q does not report the OOM kill", errs)
			}
		})
	}
}

func TestProbePidsLimit(t *testing.T) {
	e := newEnv(t, 0)
	// The subshell dies when fork fails; the shell reads how far it got
	// with builtins only, since it cannot fork either until the sleepers
	// are killed.
	script := "(i=0; while [ $i -lt 60 ]; do sleep 5 & i=$((i+1)); echo $i > /tmp/n; done) 2>/tmp/err; read n < /tmp/n; echo started=$n; read e < /tmp/err; echo \"err=$e\"; kill -9 -1; exit 0"
	for kind, a := range e.kinds(script, func(a *action) {
		a.platform[PropPidsLimit] = "20"
	}) {
		t.Run(kind, func(t *testing.T) {
			code, out, errs := e.sh(a)
			t.Logf("exit %d: %s %s", code, out, errs)
			var n int
			for _, l := range lines(out) {
				fmt.Sscanf(l, "started=%d", &n)
			}
			if n == 0 || n >= 20 || !strings.Contains(out, "fork") {
				t.Errorf("started %d processes under a limit of 20", n)
			}
		})
	}
}

func TestProbePTY(t *testing.T) {
	e := newEnv(t, 0)
	script := `if [ -t 1 ] && [ -t 2 ]; then echo tty; fi; readlink /proc/self/fd/1; readlink /proc/self/fd/2; echo out1; echo err1 >&2; printf 'a\tb\r\n'; echo out2`
	a := e.nixAction(script, func(a *action) { a.platform[PropPTY] = "true" })
	code, out, errs := e.sh(a)
	if code != 0 {
		t.Fatalf("exit %d: %q %q", code, out, errs)
	}
	want := "tty\n/dev/pts/0\n/dev/pts/0\nout1\nerr1\na\tb\r\nout2\n"
	if out != want || errs != "" {
		t.Fatalf("pty stream %q (stderr %q), want %q", out, errs, want)
	}
	// Without the option, streams are pipes, separate.
	a = e.nixAction(script, nil)
	_, out, errs = e.sh(a)
	if strings.Contains(out, "tty\n") || !strings.HasPrefix(out, "pipe:") && !strings.HasPrefix(out, "/") || errs != "err1\n" {
		t.Fatalf("without pty: stdout %q stderr %q", out, errs)
	}
}

func TestOutputsAllKinds(t *testing.T) {
	e := newEnv(t, 0)
	script := `
echo data > out/file
printf '#!/bin/sh\n' > out/tool; chmod +x out/tool
mkdir -p out/dir/sub; echo a > out/dir/a; echo b > out/dir/sub/b; ln -s a out/dir/link; ln -s /etc/shadow out/dir/shadow
ln -s /etc/shadow out/shadowlink
mkdir -p ../nix/store/abc-out/bin; echo nix > ../nix/store/abc-out/bin/x
`
	a := e.nixAction(script, func(a *action) {
		a.outputs = []string{"out/file", "out/tool", "out/dir", "out/shadowlink", "out/missing", "../nix/store/abc-out"}
		a.root["build/out/.keep"] = file("")
	})
	resp := e.run(a)
	r := resp.Result
	if r.ExitCode != 0 {
		t.Fatalf("exit %d: %s", r.ExitCode, e.blob(r.StderrDigest))
	}
	files := map[string]*repb.OutputFile{}
	for _, f := range r.OutputFiles {
		files[f.Path] = f
	}
	if f := files["out/file"]; f == nil || e.blob(f.Digest) != "data\n" || f.IsExecutable {
		t.Errorf("out/file: %v", f)
	}
	if f := files["out/tool"]; f == nil || !f.IsExecutable {
		t.Errorf("out/tool: %v", f)
	}
	if len(r.OutputSymlinks) != 1 || r.OutputSymlinks[0].Path != "out/shadowlink" || r.OutputSymlinks[0].Target != "/etc/shadow" {
		t.Errorf("symlinks: %v", r.OutputSymlinks)
	}
	dirs := map[string]*repb.OutputDirectory{}
	for _, d := range r.OutputDirectories {
		dirs[d.Path] = d
	}
	if dirs["out/dir"] == nil || dirs["../nix/store/abc-out"] == nil || len(dirs) != 2 {
		t.Fatalf("directories: %v", r.OutputDirectories)
	}
	tree := &repb.Tree{}
	if err := protoUnmarshal(e.blob(dirs["out/dir"].TreeDigest), tree); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range tree.Root.Files {
		names = append(names, "f:"+f.Name)
	}
	for _, s := range tree.Root.Symlinks {
		names = append(names, "l:"+s.Name+"->"+s.Target)
	}
	for _, d := range tree.Root.Directories {
		names = append(names, "d:"+d.Name)
	}
	if got := strings.Join(names, " "); got != "f:a l:link->a l:shadow->/etc/shadow d:sub" {
		t.Errorf("tree root: %s", got)
	}
	md := r.ExecutionMetadata
	if md.Worker != "test-worker" {
		t.Errorf("worker %q", md.Worker)
	}
	ts := []*struct {
		name string
		t    time.Time
	}{
		{"queued", md.QueuedTimestamp.AsTime()}, {"worker start", md.WorkerStartTimestamp.AsTime()},
		{"input fetch start", md.InputFetchStartTimestamp.AsTime()}, {"input fetch completed", md.InputFetchCompletedTimestamp.AsTime()},
		{"execution start", md.ExecutionStartTimestamp.AsTime()}, {"execution completed", md.ExecutionCompletedTimestamp.AsTime()},
		{"output upload start", md.OutputUploadStartTimestamp.AsTime()}, {"output upload completed", md.OutputUploadCompletedTimestamp.AsTime()},
		{"worker completed", md.WorkerCompletedTimestamp.AsTime()},
	}
	for i := range ts {
		if ts[i].t.Year() < 2020 {
			t.Errorf("%s timestamp not set", ts[i].name)
		}
		if i > 0 && ts[i].t.Before(ts[i-1].t) {
			t.Errorf("%s (%v) before %s (%v)", ts[i].name, ts[i].t, ts[i-1].name, ts[i-1].t)
		}
	}
}

func TestOutputsEscapingRejected(t *testing.T) {
	e := newEnv(t, 0)
	for _, out := range []string{"../../etc/passwd", "/etc/passwd", "../..", ""} {
		a := e.nixAction("true", func(a *action) { a.outputs = []string{out} })
		_, err := e.exec.Execute(context.Background(), &Request{Action: e.upload(a)})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("output %q: err %v, want INVALID_ARGUMENT", out, err)
		}
	}
}

func TestBazelStyleAction(t *testing.T) {
	e := newEnv(t, 0)
	a := action{
		args:     []string{"/bin/bash", "-c", `set -e; mkdir -p bazel-out/k8/bin/pkg/gen; cat pkg/a.txt pkg/b.txt > bazel-out/k8/bin/pkg/ab.txt; tr a-z A-Z < pkg/a.txt > bazel-out/k8/bin/pkg/gen/upper.txt; echo $PWD >&2; ls /usr/bin/bash`},
		env:      map[string]string{"PATH": "/usr/bin:/bin"},
		root:     map[string]entry{"pkg/a.txt": file("hello\n"), "pkg/b.txt": file("world\n")},
		outFiles: []string{"bazel-out/k8/bin/pkg/ab.txt"},
		outDirs:  []string{"bazel-out/k8/bin/pkg/gen"},
	}
	resp := e.run(a)
	r := resp.Result
	if r.ExitCode != 0 {
		t.Fatalf("exit %d: %s", r.ExitCode, e.blob(r.StderrDigest))
	}
	if len(r.OutputFiles) != 1 || e.blob(r.OutputFiles[0].Digest) != "hello\nworld\n" {
		t.Errorf("output files %v", r.OutputFiles)
	}
	if len(r.OutputDirectories) != 1 {
		t.Errorf("output dirs %v", r.OutputDirectories)
	}
	if errs := e.blob(r.StderrDigest); errs != "/work\n" {
		t.Errorf("stderr %q", errs)
	}
}

func TestMissingInput(t *testing.T) {
	e := newEnv(t, 0)
	a := e.nixAction("true", nil)
	ad := e.upload(a)
	// An action whose input root is not in the CAS.
	act := &repb.Action{}
	protoUnmarshal(e.blob(ad.Proto()), act)
	act.InputRootDigest = &repb.Digest{Hash: strings.Repeat("ab", 32), SizeBytes: 10}
	_, err := e.exec.Execute(context.Background(), &Request{Action: e.putProto(act)})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("err %v, want FAILED_PRECONDITION missing", err)
	}
}

func TestPlatformMismatch(t *testing.T) {
	e := newEnv(t, 0)
	for _, p := range []map[string]string{
		{PropNixSystem: "aarch64-linux"},
		{PropNixSystem: "x86_64-linux", PropNixFeatures: "kvm,nixos-test"},
		{PropOSFamily: "windows"},
	} {
		a := e.nixAction("true", func(a *action) { a.platform = p })
		_, err := e.exec.Execute(context.Background(), &Request{Action: e.upload(a)})
		if status.Code(err) != codes.FailedPrecondition {
			t.Errorf("platform %v: err %v, want FAILED_PRECONDITION", p, err)
		}
	}
	a := e.nixAction("true", func(a *action) { a.platform[PropNixFeatures] = "big-parallel,kvm" })
	if code, _, errs := e.sh(a); code != 0 {
		t.Errorf("features subset refused: %d %s", code, errs)
	}
	// min-memory: more than the host has, or more than the action's own
	// limit, is refused; a little runs.
	for _, p := range []map[string]string{
		{PropMinMemory: "1048576G"},
		{PropMinMemory: "200M", PropMemoryLimit: "100M"},
	} {
		a := e.nixAction("true", func(a *action) { maps.Copy(a.platform, p) })
		_, err := e.exec.Execute(context.Background(), &Request{Action: e.upload(a)})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "needs") {
			t.Errorf("platform %v: err %v, want FAILED_PRECONDITION", p, err)
		}
	}
	a = e.nixAction("true", func(a *action) { a.platform[PropMinMemory] = "1M" })
	if code, _, errs := e.sh(a); code != 0 {
		t.Errorf("min-memory 1M refused: %d %s", code, errs)
	}
}

func TestCommandNotFound(t *testing.T) {
	e := newEnv(t, 0)
	a := e.nixAction("true", func(a *action) { a.args = []string{"/nix/store/nope/bin/sh"} })
	code, _, errs := e.sh(a)
	if code != 127 || !strings.Contains(errs, "/nix/store/nope/bin/sh") {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
}

// TestLargeClosure runs a Nix action whose input closure has 1,200 store
// paths (more than one overlay takes): the builder sees every one, its
// store is an overlay, and its output is collected from it.
func TestLargeClosure(t *testing.T) {
	e := newEnv(t, 1)
	const n = 1200
	script := `
ls /nix/store | wc -l
cat /nix/store/00000000000000000000000000000000-p0/share/f /nix/store/00000000000000000000000000001199-p1199/share/f
grep ' /nix/store ' /proc/self/mountinfo | grep -q ' - overlay ' && echo overlay
mkdir $out && ls /nix/store | wc -l > $out/count
`
	a := e.nixAction(script, func(a *action) {
		for i := range n {
			a.root[fmt.Sprintf("nix/store/%032d-p%d/share/f", i, i)] = file(fmt.Sprintf("path %d\n", i))
		}
		a.env["out"] = "/nix/store/abc-out"
		a.outputs = []string{"../nix/store/abc-out"}
	})
	for run := range 2 { // the second run finds its layers ready
		resp := e.run(a)
		out := e.blob(resp.Result.StdoutDigest)
		if resp.Result.ExitCode != 0 {
			t.Fatalf("run %d: exit %d: %s %s", run, resp.Result.ExitCode, out, e.blob(resp.Result.StderrDigest))
		}
		want := fmt.Sprintf("%d\npath 0\npath 1199\noverlay\n", n+1) // + busybox
		if out != want {
			t.Errorf("run %d: stdout %q, want %q", run, out, want)
		}
		if len(resp.Result.OutputDirectories) != 1 {
			t.Fatalf("run %d: outputs %v", run, resp.Result)
		}
	}
}
