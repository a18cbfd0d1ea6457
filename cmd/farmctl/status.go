package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"encoding/json"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
)

// status prints what a tvixfarm process runs and stores.
func statusCmd(args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	farm := fs.String("farm", "127.0.0.1:8980", "tvixfarm address (host:port)")
	timeout := fs.Duration("timeout", 10*time.Second, "deadline of the status call")
	asJSON := fs.Bool("json", false, "print JSON for scripts: {\"process\": ..., \"cluster\": ...}")
	if err := fs.Parse(args); err != nil {
		return err
	}
	conn, err := grpc.NewClient(*farm, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	st, err := adminpb.NewAdminClient(conn).Status(ctx, &adminpb.StatusRequest{})
	if err != nil {
		return fmt.Errorf("status of %s: %w", *farm, err)
	}
	// The scheduler cluster, if this process is a scheduler node.
	cl, clErr := adminpb.NewClusterClient(conn).Status(ctx, &adminpb.ClusterStatusRequest{})
	if status.Code(clErr) == codes.Unimplemented {
		cl, clErr = nil, nil
	}
	if *asJSON {
		p, _ := protojson.Marshal(st)
		out := map[string]json.RawMessage{"process": p}
		if cl != nil {
			c, _ := protojson.MarshalOptions{EmitUnpopulated: true}.Marshal(cl)
			out["cluster"] = c
		}
		b, _ := json.MarshalIndent(out, "", "  ")
		fmt.Println(string(b))
		return clErr
	}
	fmt.Printf("farm     %s\nversion  %s\nroles    %v\ndata     %s\nuptime   %s\n\n", *farm, st.Version, st.Roles, st.DataDir,
		time.Since(time.Unix(st.StartedUnix, 0)).Round(time.Second))
	if e := st.Executor; e != nil {
		fmt.Printf("executor %s: %d/%d slots busy\nplatform %s\n\n", e.Name, e.Running, e.Slots, strings.Join(e.Platform, " "))
	}
	if x := st.Execution; x != nil {
		printExecution(x)
	}
	if clErr != nil {
		fmt.Printf("cluster: %v\n\n", clErr)
	} else if cl != nil {
		printCluster(os.Stdout, cl)
		fmt.Println()
	}
	if len(st.Stores) == 0 {
		return clErr
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "instance\tstore\tbackend\tblobs\tbytes\tmax\n")
	for _, s := range st.Stores {
		inst := s.Instance
		if inst == "" {
			inst = "(default)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", inst, s.Kind, s.Backend, count(s.Blobs), bytesStr(s.Bytes), bytesStr(s.MaxBytes))
	}
	return tw.Flush()
}

// printExecution shows a gateway's remote execution backend.
func printExecution(x *adminpb.ExecutionBackendStatus) {
	health := "healthy"
	if !x.Healthy {
		health = "UNHEALTHY: " + x.Error
	}
	inst := x.InstanceName
	if inst == "" {
		inst = "(default)"
	}
	fmt.Printf("execution %s %s, instance %s, %s, REAPI %s: %s\n", x.Backend, x.Address, inst, x.DigestFunction, x.ApiVersion, health)
	fmt.Printf("          %d queued, %d/%d executing; %d forwarded, %d failed\n\n", x.Queued, x.Executing, x.Concurrency, x.Forwarded, x.Failed)
}

func count(n int64) string {
	if n < 0 {
		return "?"
	}
	return fmt.Sprint(n)
}

func bytesStr(n int64) string {
	switch {
	case n < 0:
		return "?"
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
