module kubellm/bench

go 1.22
