package scheduler

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

// TestLogStoreMigratesBolt: a data directory of an earlier version, with a
// raft-boltdb store, opens with the same logs and raft's stable keys, and
// the old store is kept aside.
func TestLogStoreMigratesBolt(t *testing.T) {
	dir := t.TempDir()
	old, err := raftboltdb.NewBoltStore(filepath.Join(dir, boltFileName))
	if err != nil {
		t.Fatal(err)
	}
	var logs []*raft.Log
	for i := uint64(5); i <= 40; i++ {
		logs = append(logs, &raft.Log{Index: i, Term: 2, Type: raft.LogCommand, Data: []byte{byte(i), 'x'}})
	}
	if err := old.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	if err := old.SetUint64([]byte("CurrentTerm"), 2); err != nil {
		t.Fatal(err)
	}
	if err := old.SetUint64([]byte("LastVoteTerm"), 2); err != nil {
		t.Fatal(err)
	}
	if err := old.Set([]byte("LastVoteCand"), []byte("node2")); err != nil {
		t.Fatal(err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}

	w, err := openLogStore(dir, hclog.NewNullLogger(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	first, _ := w.FirstIndex()
	last, _ := w.LastIndex()
	if first != 5 || last != 40 {
		t.Fatalf("indexes %d..%d, want 5..40", first, last)
	}
	var l raft.Log
	if err := w.GetLog(17, &l); err != nil || l.Term != 2 || string(l.Data) != string([]byte{17, 'x'}) {
		t.Fatalf("log 17: %+v, %v", l, err)
	}
	if v, err := w.GetUint64([]byte("CurrentTerm")); err != nil || v != 2 {
		t.Fatalf("CurrentTerm %d, %v", v, err)
	}
	if v, err := w.Get([]byte("LastVoteCand")); err != nil || string(v) != "node2" {
		t.Fatalf("LastVoteCand %q, %v", v, err)
	}
	if err := w.StoreLogs([]*raft.Log{{Index: 41, Term: 3, Type: raft.LogCommand}}); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, boltFileName)); !os.IsNotExist(err) {
		t.Fatalf("%s still there: %v", boltFileName, err)
	}
	if _, err := os.Stat(filepath.Join(dir, boltFileName+".migrated")); err != nil {
		t.Fatal(err)
	}

	// Reopened: no second migration, the new entry is there.
	w, err = openLogStore(dir, hclog.NewNullLogger(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if last, _ := w.LastIndex(); last != 41 {
		t.Fatalf("last index %d after reopening, want 41", last)
	}
}

// TestLogStoreRefusesTwoStores: a directory with both stores is refused
// with an error that says what to do.
func TestLogStoreRefusesTwoStores(t *testing.T) {
	dir := t.TempDir()
	w, err := openLogStore(dir, hclog.NewNullLogger(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	old, err := raftboltdb.NewBoltStore(filepath.Join(dir, boltFileName))
	if err != nil {
		t.Fatal(err)
	}
	old.Close()
	_, err = openLogStore(dir, hclog.NewNullLogger(), slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "remove") {
		t.Fatalf("err = %v, want a refusal naming what to remove", err)
	}
}
