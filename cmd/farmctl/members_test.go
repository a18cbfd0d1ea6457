package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
)

// clusterNode is a farm with the storage and scheduler roles, started in
// the background: a node that joins a cluster is not ready (farm.New
// waits for a leader) until it has been added.
type clusterNode struct {
	addr chan string
	err  chan error
}

func startClusterNode(t *testing.T, id, raftAddr string, bootstrap bool) *clusterNode {
	t.Helper()
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.Data = t.TempDir()
	cfg.Role = "storage,scheduler"
	cfg.Scheduler.NodeID = id
	cfg.Scheduler.RaftListen = raftAddr
	cfg.Scheduler.Bootstrap = &bootstrap
	ctx, cancel := context.WithCancel(context.Background())
	n := &clusterNode{addr: make(chan string, 1), err: make(chan error, 1)}
	go func() {
		f, err := farm.New(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			n.err <- err
			return
		}
		n.addr <- f.Addr()
		n.err <- f.Serve(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-n.err:
		case <-time.After(30 * time.Second):
			t.Errorf("%s did not stop", id)
		}
	})
	return n
}

// wait returns the node's gRPC address once it serves.
func (n *clusterNode) wait(t *testing.T) string {
	t.Helper()
	select {
	case a := <-n.addr:
		return a
	case err := <-n.err:
		t.Fatal(err)
	case <-time.After(30 * time.Second):
		t.Fatal("the node did not start within 30 s")
	}
	return ""
}

func freeTCPAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// members runs farmctl members with --json and returns the member ids,
// sorted, and the leader.
func members(t *testing.T, args ...string) ([]string, string, error) {
	t.Helper()
	var out bytes.Buffer
	if err := runMembers(append(args, "--json"), &out); err != nil {
		return nil, "", err
	}
	var st adminpb.ClusterStatus
	if err := protojson.Unmarshal(out.Bytes(), &st); err != nil {
		t.Fatalf("members %v: %v\n%s", args, err, out.String())
	}
	var ids []string
	for _, m := range st.Members {
		ids = append(ids, m.Id)
	}
	slices.Sort(ids)
	return ids, st.Leader, nil
}

// TestMembers grows a one-node farm to three with farmctl members add,
// lists and removes members, and checks the errors.
func TestMembers(t *testing.T) {
	raft1, raft2, raft3 := freeTCPAddr(t), freeTCPAddr(t), freeTCPAddr(t)
	a1 := startClusterNode(t, "node1", raft1, true).wait(t)
	n2 := startClusterNode(t, "node2", raft2, false)
	n3 := startClusterNode(t, "node3", raft3, false)

	// node2's raft may not listen yet: the add is refused until it does.
	var ids []string
	var err error
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		ids, _, err = members(t, "add", "node2", raft2, "--farm", a1)
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || !slices.Equal(ids, []string{"node1", "node2"}) {
		t.Fatalf("add node2: %v %v", ids, err)
	}
	// node2 knows the leader now: node3 is added through it.
	a2 := n2.wait(t)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		ids, _, err = members(t, "add", "node3", raft3, "--farm", a2)
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || !slices.Equal(ids, []string{"node1", "node2", "node3"}) {
		t.Fatalf("add node3: %v %v", ids, err)
	}
	a3 := n3.wait(t)
	// Every node answers with the same view (forwarded to the leader).
	for _, a := range []string{a1, a2, a3} {
		ids, leader, err := members(t, "--farm", a)
		if err != nil || !slices.Equal(ids, []string{"node1", "node2", "node3"}) || leader != "node1" {
			t.Fatalf("members list via %s: %v leader %q: %v", a, ids, leader, err)
		}
	}
	var out bytes.Buffer
	if err := runMembers([]string{"list", "--farm", a3}, &out); err != nil || !strings.Contains(out.String(), "node3") {
		t.Fatalf("members list: %v\n%s", err, out.String())
	}

	if ids, _, err = members(t, "remove", "node3", "--farm", a2); err != nil || !slices.Equal(ids, []string{"node1", "node2"}) {
		t.Fatalf("remove node3: %v %v", ids, err)
	}
	// Mistakes.
	for _, args := range [][]string{
		{"remove", "node3", "--farm", a1},                       // not a member any more
		{"add", "node9", a3, "--farm", a1},                      // a gRPC address, not raft's
		{"add", "node9", raft2, "--farm", a1},                   // node2's raft address
		{"add", "node9", "--farm", a1},                          // no address
		{"frobnicate", "--farm", a1},                            // no such subcommand
		{"list", "--farm", "127.0.0.1:1", "--timeout", "300ms"}, // nobody there
	} {
		if _, _, err := members(t, args...); err == nil {
			t.Errorf("members %v succeeded", args)
		} else {
			t.Logf("members %v: %v", args, err)
		}
	}
	if ids, _, err = members(t, "--farm", a2); err != nil || !slices.Equal(ids, []string{"node1", "node2"}) {
		t.Fatalf("after the mistakes: %v %v", ids, err)
	}
}
