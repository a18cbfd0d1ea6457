package scheduler

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/hashicorp/go-hclog"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	raftwal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/migrate"
)

const (
	// walDirName is the raft log and stable store (raft-wal) in a node's
	// data directory.
	walDirName = "raft-wal"
	// boltFileName is the raft-boltdb store that earlier versions kept;
	// it is migrated into walDirName once and then renamed to
	// boltFileName+".migrated".
	boltFileName = "raft.db"
	// walSegmentSize is the size of one preallocated log segment. raft-wal's
	// default, 64 MiB, is a lot for the scheduler's entries, which a
	// snapshot every SnapshotThreshold entries truncates.
	walSegmentSize = 16 << 20
)

// openLogStore opens the raft log and stable store of dir: a write-ahead
// log (raft-wal) that appends each batch of entries to a segment file and
// fsyncs it once, without raft-boltdb's B+tree pages and meta writes. A
// raft-boltdb store that an earlier version left in dir is copied into it
// first (logs and raft's stable keys), then kept as raft.db.migrated.
func openLogStore(dir string, log hclog.Logger, lg *slog.Logger) (*raftwal.WAL, error) {
	walDir := filepath.Join(dir, walDirName)
	boltPath := filepath.Join(dir, boltFileName)
	_, walErr := os.Stat(walDir)
	_, boltErr := os.Stat(boltPath)
	switch {
	case walErr == nil && boltErr == nil:
		return nil, fmt.Errorf("raft store: %s has both %s and %s: remove %s if the node ran since the migration (it is stale), or start the node with a new data directory", dir, walDirName, boltFileName, boltPath)
	case errors.Is(walErr, fs.ErrNotExist) && boltErr == nil:
		if err := migrateBolt(dir, boltPath, walDir, log); err != nil {
			return nil, fmt.Errorf("raft store: migrating %s to %s (the old store is left as it was; to start over instead, remove the data directory and join the node to the cluster anew): %w", boltPath, walDir, err)
		}
		lg.Info("scheduler: raft log migrated from raft-boltdb to raft-wal", "from", boltPath+".migrated", "to", walDir)
	case walErr != nil && !errors.Is(walErr, fs.ErrNotExist):
		return nil, fmt.Errorf("raft store: %w", walErr)
	}
	if err := os.MkdirAll(walDir, 0o700); err != nil {
		return nil, fmt.Errorf("raft store: %w", err)
	}
	w, err := raftwal.Open(walDir, raftwal.WithLogger(log), raftwal.WithSegmentSize(walSegmentSize))
	if err != nil {
		return nil, fmt.Errorf("raft store: opening %s: %w", walDir, err)
	}
	return w, nil
}

// migrateBolt copies the raft-boltdb store at boltPath into a new raft-wal
// at walDir. It builds the WAL in a temporary directory and renames it into
// place, then renames boltPath aside, so that a crash at any point leaves
// either the old store alone (the migration runs again) or the new one.
func migrateBolt(dir, boltPath, walDir string, log hclog.Logger) error {
	tmp := walDir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return err
	}
	src, err := raftboltdb.NewBoltStore(boltPath)
	if err != nil {
		return fmt.Errorf("opening %s: %w", boltPath, err)
	}
	defer src.Close()
	dst, err := raftwal.Open(tmp, raftwal.WithLogger(log), raftwal.WithSegmentSize(walSegmentSize))
	if err != nil {
		return fmt.Errorf("creating %s: %w", tmp, err)
	}
	ctx := context.Background()
	if err := migrate.CopyLogs(ctx, dst, src, 4<<20, nil); err != nil {
		dst.Close()
		return fmt.Errorf("copying logs: %w", err)
	}
	if err := migrate.CopyStable(ctx, dst, src, nil, nil, nil); err != nil {
		dst.Close()
		return fmt.Errorf("copying stable keys: %w", err)
	}
	if err := dst.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, walDir); err != nil {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	if err := os.Rename(boltPath, boltPath+".migrated"); err != nil {
		return err
	}
	return syncDir(dir)
}

// syncDir fsyncs directory dir, making renames in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
