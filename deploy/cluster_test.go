// Package deploy holds deployment files; its test runs
// local-cluster.sh as a user would.
package deploy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestLocalCluster builds the binaries, brings up the three-node cluster
// of local-cluster.sh (no-op executors), runs farmctl against it, kills
// the leader's process and checks the cluster carries on, then stops it.
func TestLocalCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries and runs 6 processes")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	build := exec.Command("go", "build", "-o", bin+"/", "../cmd/tvixfarm", "../cmd/farmctl")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	env := append(os.Environ(), "TVIXFARM_CLUSTER_DIR="+filepath.Join(dir, "cluster"),
		"TVIXFARM_BIN="+filepath.Join(bin, "tvixfarm"), "TVIXFARM_CLUSTER_SANDBOX=noop", "TVIXFARM_CLUSTER_SLOTS=64")
	script := func(args ...string) (string, error) {
		cmd := exec.Command("./local-cluster.sh", args...)
		cmd.Env = env
		var out bytes.Buffer
		cmd.Stdout = &out
		cmd.Stderr = &out
		err := cmd.Run()
		return out.String(), err
	}
	out, err := script("up")
	t.Cleanup(func() { script("down") })
	if err != nil {
		t.Fatalf("up: %v\n%s", err, out)
	}
	client, cacheURL := "", ""
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if a, ok := strings.CutPrefix(sc.Text(), "client: "); ok {
			client = a
		}
		if a, ok := strings.CutPrefix(sc.Text(), "binary cache: "); ok {
			cacheURL = a
		}
	}
	if client == "" || cacheURL == "" {
		t.Fatalf("no client or binary cache line in:\n%s", out)
	}
	// The binary cache of a scheduler node (which reads the storage
	// node's store through its proxy) and of the storage node.
	for _, u := range []string{cacheURL, "http://127.0.0.10:8981"} {
		resp, err := http.Get(u + "/nix-cache-info")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(body), "StoreDir: /nix/store") {
			t.Errorf("%s/nix-cache-info: %s %q", u, resp.Status, body)
		}
		resp, err = http.Get(u + "/00000000000000000000000000000000.narinfo")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 404 {
			t.Errorf("%s: unknown narinfo: %s", u, resp.Status)
		}
	}
	farmctl := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(filepath.Join(bin, "farmctl"), append(args, "--farm", client)...).CombinedOutput()
		if err != nil {
			t.Fatalf("farmctl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	var st struct {
		Cluster struct {
			Leader  string
			Members []struct{ Id, Raft string }
			Workers []struct{ Id string }
		}
	}
	if err := json.Unmarshal([]byte(farmctl("status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Cluster.Members) != 3 || len(st.Cluster.Workers) != 2 || st.Cluster.Leader == "" {
		t.Fatalf("status: %+v", st.Cluster)
	}
	for _, m := range st.Cluster.Members {
		if !strings.HasSuffix(m.Raft, ":8982") {
			t.Errorf("member %s: raft address %s, want port 8982", m.Id, m.Raft)
		}
	}
	farmctl("bench", "exec", "--actions", "300")
	farmctl("drain", "exec1")
	if w := farmctl("workers"); !strings.Contains(w, "drained") {
		t.Errorf("workers after drain:\n%s", w)
	}
	farmctl("undrain", "exec1")
	if ops := farmctl("ops", "--state", "completed"); strings.Count(ops, "\n") < 300 {
		t.Errorf("ops lists %d lines", strings.Count(ops, "\n"))
	}

	// Kill the leader's process; the bench (through node1, or node2 if
	// node1 was the leader) still completes.
	pid, err := os.ReadFile(filepath.Join(dir, "cluster", st.Cluster.Leader, "pid"))
	if err != nil {
		t.Fatal(err)
	}
	var p int
	if _, err := fmt.Sscan(strings.TrimSpace(string(pid)), &p); err != nil {
		t.Fatal(err)
	}
	t.Logf("killing the leader, %s", st.Cluster.Leader)
	syscall.Kill(p, syscall.SIGKILL)
	if st.Cluster.Leader == "node1" {
		client = "127.0.0.12:8980"
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command(filepath.Join(bin, "farmctl"), "bench", "exec", "--actions", "100", "--farm", client).CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no working cluster 30 s after the leader was killed: %v\n%s", err, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
	// Both executors work for the new leader, also the one whose first
	// scheduler address was the dead node's: each registered again, with
	// a live node.
	for _, e := range []string{"exec1", "exec2"} {
		var last string
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			log, _ := os.ReadFile(filepath.Join(dir, "cluster", e, "log"))
			for l := range strings.Lines(string(log)) {
				if strings.Contains(l, "worker: registered") {
					last = l
				}
			}
			if last != "" && !strings.Contains(last, "node="+st.Cluster.Leader+" ") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s has not registered with a live node 20 s after %s was killed; last: %s", e, st.Cluster.Leader, last)
			}
		}
	}
	if out, err := script("down"); err != nil {
		t.Fatalf("down: %v\n%s", err, out)
	}
}
