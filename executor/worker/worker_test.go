package worker

import (
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNextBackoff: while a cluster elects a leader (UNAVAILABLE, or
// sessions ended by the node) workers retry often; refusals back off to
// seconds.
func TestNextBackoff(t *testing.T) {
	unavailable := status.Error(codes.Unavailable, "scheduler: no leader yet; retry")
	refused := status.Error(codes.PermissionDenied, "no")
	for _, tc := range []struct {
		d    time.Duration
		err  error
		want time.Duration
	}{
		{50 * time.Millisecond, unavailable, 100 * time.Millisecond},
		{100 * time.Millisecond, unavailable, unavailableBackoff},
		{800 * time.Millisecond, unavailable, unavailableBackoff},
		{100 * time.Millisecond, io.EOF, unavailableBackoff},
		{100 * time.Millisecond, fmt.Errorf("session: %w", io.EOF), unavailableBackoff},
		{100 * time.Millisecond, refused, 200 * time.Millisecond},
		{800 * time.Millisecond, refused, 1600 * time.Millisecond},
		{1600 * time.Millisecond, refused, 2 * time.Second},
		{1600 * time.Millisecond, errors.New("registering took too long"), 2 * time.Second},
	} {
		if got := nextBackoff(tc.d, tc.err); got != tc.want {
			t.Errorf("nextBackoff(%v, %v) = %v, want %v", tc.d, tc.err, got, tc.want)
		}
	}
}
