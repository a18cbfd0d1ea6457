package executor

import (
	"strings"
	"testing"
)

// TestPlainREAPI: with Config.PlainREAPI an action with Nix's platform
// runs as on a stock chrooting worker: chrooted into its input root as it
// is (no /etc added, input files read-only as in the cache), argv[0] as
// given, stdout and stderr separate although nix-pty asks for a pty, and
// no network although network=true asks for the host's.
func TestPlainREAPI(t *testing.T) {
	e := newEnv(t, 0)
	e.exec.cfg.PlainREAPI = true
	script := `echo "argv0=$(tr '\0' '\n' < /proc/$$/cmdline | head -n 1)"
if [ -t 1 ]; then echo tty; fi
if [ -e /etc ]; then echo etc; else echo no-etc; fi
echo "mode=$(stat -c %a /build/f)"
echo "ifs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ' ')"
echo err >&2`
	a := e.nixAction(script, func(a *action) {
		a.platform[PropPTY] = "true"
		a.platform[PropNetwork] = "true"
		a.platform[PropMemoryLimit] = "1G"
		a.root["build/f"] = file("x")
	})
	code, out, errs := e.sh(a)
	if code != 0 {
		t.Fatalf("exit %d: %q %q", code, out, errs)
	}
	for _, want := range []string{"argv0=/" + busyboxPath + "/bin/sh", "no-etc", "mode=444", "ifs=lo"} {
		if !hasLine(out, want) {
			t.Errorf("want %q in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "tty\n") || errs != "err\n" {
		t.Errorf("stdout %q, stderr %q: want separate streams, no pty", out, errs)
	}
}
